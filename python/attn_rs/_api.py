"""attention(): one call for NumPy arrays and torch tensors, differentiable on torch."""

import numpy as np

from . import _native

try:  # torch is optional: NumPy arrays need none of it
    import torch
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None


_STAGES = tuple(_native.stage_names())


def stage_names():
    """The algorithms ``algo`` takes, in the order of the story."""
    return list(_STAGES)


def cuda_available():
    """Whether a CUDA device is present, so that ``device="cuda"`` can run."""
    return bool(_native.cuda_available())


def _is_tensor(x):
    return torch is not None and isinstance(x, torch.Tensor)


def _check_array(name, x, ndim, dtype=np.float32, what="float32"):
    """`x` as the array the native call takes: its kind, rank and type checked by name."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a NumPy array or a torch tensor, not {type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {what}, but it is {x.dtype}")
    if ndim is not None and x.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, but it has shape {tuple(x.shape)}")
    return x


_F32 = np.dtype(np.float32)


def _qkv_array(name, x):
    """q, k, v or d_out as the native call's float32 4-D array: the common case (a float32
    array, or a CPU float32 tensor read in place) in a few attribute reads, anything else
    through the checks that say what is wrong."""
    if type(x) is np.ndarray:
        if x.dtype is _F32 and x.ndim == 4:
            return x
    elif _is_tensor(x) and x.dtype is torch.float32 and not x.is_cuda:
        a = x.detach().numpy() if x.requires_grad else x.numpy()
        if a.ndim == 4:
            return a
    return _check_array(name, _as_numpy(name, x), 4)


def _as_numpy(name, x):
    """A CPU tensor's memory as a NumPy array (no copy); an array as it is."""
    if _is_tensor(x):
        if x.is_cuda:
            raise ValueError(f"{name} is a CUDA tensor and q is not: put all of them on one device")
        if x.dtype != torch.float32 and x.dtype != torch.bool:
            raise ValueError(f"{name} must be float32 (bool for a mask), but it is {x.dtype}")
        return x.detach().numpy()
    return x


class _Call:
    """A call's checked arguments: the stage, the options, the optional tensors' shapes."""

    def __init__(self, q, algo, device, causal, mask, bias, scale, dropout, seed, window,
                 softcap, alibi, q_block, k_block, deterministic):
        if not isinstance(algo, str) or algo not in _STAGES:
            raise ValueError(f"algo must be one of {stage_names()}, not {algo!r}")
        if device is None:
            device = "cuda" if _is_tensor(q) and q.is_cuda else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if device == "cuda" and not cuda_available():
            raise ValueError("device='cuda' needs a CUDA device, and none was found: use device='cpu'")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        if window is not None:
            if len(window) != 2:
                raise ValueError(f"window must be (left, right), -1 for unbounded, not {window!r}")
            window = (int(window[0]), int(window[1]))
        self.algo, self.device = algo, device
        self.opts = {
            "causal": bool(causal),
            "scale": None if scale is None else float(scale),
            "dropout": float(dropout),
            "seed": int(seed),
            "window": window,
            "softcap": None if softcap is None else float(softcap),
            "q_block": None if q_block is None else int(q_block),
            "k_block": None if k_block is None else int(k_block),
            "deterministic": bool(deterministic),
        }
        self.mask, self.alibi = mask, alibi
        self.bias_shape = None if bias is None else tuple(bias.shape)

    def arrays(self, q, k, v, bias):
        """The native call's arrays: rank and type checked, a bias of fewer than 4
        dimensions and a `[heads]` ALiBi vector given leading axes of 1."""
        q, k, v = _qkv_array("q", q), _qkv_array("k", k), _qkv_array("v", v)
        mask = self.mask
        if mask is not None:
            mask = _check_array("mask", _as_numpy("mask", mask), (2, 4), np.bool_, "bool")
        if bias is not None:
            bias = _check_array("bias", _as_numpy("bias", bias), None)
            if bias.ndim > 4:
                raise ValueError(f"bias must have at most 4 dimensions, but it has shape {bias.shape}")
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        alibi = self.alibi
        if alibi is not None:
            alibi = _check_array("alibi", _as_numpy("alibi", alibi), (1, 2))
            alibi = alibi.reshape(1, -1) if alibi.ndim == 1 else alibi
        return q, k, v, mask, bias, alibi

    def forward(self, q, k, v, bias):
        q, k, v, mask, bias, alibi = self.arrays(q, k, v, bias)
        return _native.forward(self.algo, self.device, q, k, v, mask, bias, alibi, self.opts)

    def backward(self, q, k, v, bias, out, lse, d_out, bias_grad):
        q, k, v, mask, bias, alibi = self.arrays(q, k, v, bias)
        d_out = _qkv_array("d_out", d_out)
        dq, dk, dv, dbias = _native.backward(self.algo, self.device, q, k, v, mask, bias, alibi,
                                             self.opts, out, lse, d_out, bias_grad)
        if dbias is not None:
            dbias = dbias.reshape(self.bias_shape)
        return dq, dk, dv, dbias


if torch is not None:

    # ANCHOR: autograd
    class _Attention(torch.autograd.Function):
        """The stage's forward, and its own backward pass as the gradient."""

        @staticmethod
        def forward(ctx, call, q, k, v, bias):
            out, lse = call.forward(q, k, v, bias)
            out, lse = torch.from_numpy(out), torch.from_numpy(lse)
            ctx.call = call
            ctx.save_for_backward(q, k, v, bias, out, lse)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, d_out, _d_lse):
            q, k, v, bias, out, lse = ctx.saved_tensors
            bias_grad = bias is not None and ctx.needs_input_grad[4]
            dq, dk, dv, dbias = ctx.call.backward(q, k, v, bias, out.numpy(), lse.numpy(),
                                                  d_out, bias_grad)
            dbias = torch.from_numpy(dbias) if dbias is not None else None
            return None, torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv), dbias
    # ANCHOR_END: autograd


def attention(q, k, v, *, algo="flash2", device=None, causal=False, mask=None, bias=None,
              scale=None, dropout=0.0, seed=0, window=None, softcap=None, alibi=None,
              return_lse=False, q_block=None, k_block=None, deterministic=False,
              check_finite=True):
    """Attention of q `[batch, heads, n_q, d]` over k, v `[batch, kv_heads, n_k, d]`.

    Takes NumPy arrays or CPU torch tensors (float32), or bf16 / fp16 CUDA tensors (the
    tensor cores, flash2, on the device; no bias yet), and returns the same kind: the output
    `[batch, heads, n_q, d]`, and with ``return_lse`` the natural-log log-sum-exp of each
    row `[batch, heads, n_q]` (-inf for a row every key is hidden from, whose output is 0).

    - ``causal``: query i sees keys up to i + n_k - n_q (bottom-right aligned).
    - ``mask``: bool, True = keep; `[batch, n_k]` key padding, or 4-D broadcastable to
      `[batch, heads, n_q, n_k]`.
    - ``bias``: float32, broadcastable to `[batch, heads, n_q, n_k]` (missing leading axes are
      1); differentiable on torch.
    - ``scale``: multiplies the scores, default 1/sqrt(d). ``softcap``: c·tanh(s/c).
    - ``window``: (left, right), -1 unbounded; ``alibi``: slopes `[heads]` or `[batch, heads]`.
    - ``dropout``, ``seed``: dropout on the attention weights, by the library's own hash of
      (seed, batch, head, query, key), so the backward drops the same weights.
    - ``algo``: a stage of ``stage_names()``; ``device``: "cpu" or "cuda" (default: where the
      tensors are). ``q_block``, ``k_block``: the tiled stages' block sizes.

    Bad input raises ValueError naming the argument, before anything is computed. On CUDA
    tensors the finiteness of q, k and v is read back from the device, which makes the host
    wait for the work queued before the call; ``check_finite=False`` skips that check (NaN
    then propagates into the output, as in SDPA).
    """
    call = _Call(q, algo, device, causal, mask, bias, scale, dropout, seed, window, softcap,
                 alibi, q_block, k_block, deterministic)
    tensors = _is_tensor(q)
    if _is_tensor(k) is not tensors or _is_tensor(v) is not tensors:
        raise ValueError("q, k and v must all be torch tensors or all NumPy arrays")
    if tensors and q.is_cuda:
        from . import _cuda  # bf16 / fp16 on the tensor cores, where the tensors are

        out, lse = _cuda.attention(call, q, k, v, bias, check_finite)
    elif tensors:
        if bias is not None and not _is_tensor(bias):
            raise ValueError("bias must be a torch tensor when q, k and v are")
        wants_grad = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
            or (bias is not None and bias.requires_grad))
        if wants_grad:
            out, lse = _Attention.apply(call, q, k, v, bias)
        else:  # nothing to differentiate: the arrays back as tensors, no graph
            out, lse = (torch.from_numpy(x) for x in call.forward(q, k, v, bias))
    else:
        out, lse = call.forward(q, k, v, bias)
    return (out, lse) if return_lse else out
