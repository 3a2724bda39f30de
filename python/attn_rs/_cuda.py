"""CUDA tensors: FlashAttention-2 on the tensor cores, on the tensors where they are.

bf16 / fp16 CUDA tensors go to the library by their device addresses; O, lse and the
gradients are allocated by torch and written in place, on the library's stream ordered
against torch's current one by events. The only host traffic is a check of the values
(torch.isfinite, reduced on the device) and the small mask and ALiBi slopes."""

import math

import torch
import torch.nn.functional as F

from . import _native

HEAD_DIMS = (64, 128, 256)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}


_FLAGS = []


def _pinned_flags():
    """Three bools in page-locked host memory, made once (a pinned allocation is slow)."""
    if not _FLAGS:
        _FLAGS.append(torch.empty(3, dtype=torch.bool, pin_memory=True))
    return _FLAGS[0]


def _padded(d):
    for n in HEAD_DIMS:
        if d <= n:
            return n
    raise ValueError(f"head_dim is {d}: CUDA tensors take head dimensions up to 256")


class CudaCall:
    """A call on CUDA tensors, checked: its dtype, shapes, options and host-side extras."""

    def __init__(self, call, q, k, v, bias, check_finite=True):
        if call.algo != "flash2":
            raise ValueError(f"algo={call.algo!r} does not run on CUDA tensors: only 'flash2' has "
                             "the tensor-core kernels (use CPU tensors or NumPy arrays for it)")
        if bias is not None:
            raise ValueError("bias is not taken with CUDA tensors yet: pass a mask, or CPU tensors")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not t.is_cuda:
                raise ValueError(f"{name} is on {t.device}, q on {q.device}: put all three on one device")
            if t.dtype not in DTYPES:
                raise ValueError(f"{name} is {t.dtype}: CUDA tensors must be bfloat16 or float16 "
                                 "(the tensor cores); float32 runs from CPU tensors or NumPy arrays")
            if t.dtype != q.dtype:
                raise ValueError(f"{name} is {t.dtype} but q is {q.dtype}: one dtype for all three")
            if t.device.index != 0:
                raise ValueError(f"{name} is on {t.device}: the library runs on cuda:0")
            if t.ndim != 4:
                raise ValueError(f"{name} must have 4 dimensions, but it has shape {tuple(t.shape)}")
        # the values, reduced on the device; read on the host after the kernel is queued
        # (check_values), so that the check does not leave the GPU idle
        self.finite = (torch.stack([torch.isfinite(t).all() for t in (q, k, v)])
                       if check_finite else None)
        self.call, self.dtype = call, DTYPES[q.dtype]
        b, h, n_q, d = q.shape
        kvh, n_k = k.shape[1], k.shape[2]
        self.d, self.dp = d, _padded(d)
        self.dims = (b, h, kvh, n_q, n_k, self.dp)
        self.opts = dict(call.opts)
        if self.opts["scale"] is None and self.dp != d:
            self.opts["scale"] = 1.0 / math.sqrt(d)  # of the true head dimension, not the padded
        mask = call.mask
        if mask is not None:
            mask = (mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.as_tensor(mask))
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool, but it is {mask.dtype}")
            mask = mask.numpy()
        alibi = call.alibi
        if alibi is not None:
            alibi = torch.as_tensor(alibi).detach().cpu().float().numpy()
            alibi = alibi.reshape(1, -1) if alibi.ndim == 1 else alibi
        self.mask, self.alibi = mask, alibi

    def pad(self, t):
        t = t.contiguous()
        return t if self.dp == self.d else F.pad(t, (0, self.dp - self.d))

    def _run(self, at, backward):
        stream = torch.cuda.current_stream(0).cuda_stream
        full = {"q": 0, "k": 0, "v": 0, "out": 0, "lse": 0, "d_out": 0, "dq": 0, "dk": 0, "dv": 0}
        full.update({name: t.data_ptr() for name, t in at.items()})
        _native.tc_call(self.dtype, self.dims, full, stream, self.mask, self.alibi, self.opts, backward)

    def check_values(self, launch):
        """Runs `launch` (which queues the kernels) between copying the finiteness of q, k
        and v to the host and reading it: the host waits for the reduction, not the kernel.
        On NaN or infinity, ValueError naming the tensor (the kernel's outputs, fresh
        tensors, are dropped)."""
        if self.finite is None:
            return launch()
        flags = _pinned_flags()
        flags.copy_(self.finite, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        result = launch()
        copied.synchronize()
        if not bool(flags.all()):
            name = "qkv"[int((~flags).nonzero()[0])]
            raise ValueError(f"{name} holds NaN or infinity: q, k and v must be finite")
        return result

    def forward(self, q, k, v):
        """(O, lse) and the padded inputs the backward takes."""
        q, k, v = self.pad(q), self.pad(k), self.pad(v)
        b, h, n_q, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
        self.check_values(lambda: self._run({"q": q, "k": k, "v": v, "out": out, "lse": lse}, False))
        return out[..., : self.d], lse, (q, k, v, out)

    def backward(self, saved, lse, d_out):
        q, k, v, out = saved
        d_out = self.pad(d_out.to(q.dtype))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._run({"q": q, "k": k, "v": v, "out": out, "lse": lse, "d_out": d_out,
                   "dq": dq, "dk": dk, "dv": dv}, backward=True)
        return dq[..., : self.d], dk[..., : self.d], dv[..., : self.d]


class CudaAttention(torch.autograd.Function):
    """The tensor-core forward, and the tensor-core backward as its gradient."""

    @staticmethod
    def forward(ctx, cc, q, k, v):
        out, lse, saved = cc.forward(q, k, v)
        ctx.cc = cc
        ctx.save_for_backward(*saved, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        *saved, lse = ctx.saved_tensors
        dq, dk, dv = ctx.cc.backward(saved, lse, d_out)
        return None, dq, dk, dv


def attention(call, q, k, v, bias, check_finite=True):
    cc = CudaCall(call, q, k, v, bias, check_finite)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return CudaAttention.apply(cc, q, k, v)
    out, lse, _ = cc.forward(q, k, v)
    return out, lse

