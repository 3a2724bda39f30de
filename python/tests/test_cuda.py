"""attn_rs on CUDA tensors (bf16 / fp16, the tensor cores): forward and gradients against the
float64 reference on the same rounded values, beside PyTorch's SDPA in the same dtype; the
tensors never leave the device. Skips where there is no CUDA device."""

import pytest
import torch

import attn_rs
from reference import close, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and attn_rs.cuda_available()), reason="no CUDA device"
)
HALF_FORWARD, HALF_BACKWARD = 1e-2, 2e-2

CASES = [
    ("causal, GQA 8:2, d 128", (2, 8, 2, 300, 300, 128), {"causal": True}),
    ("cross, n_q < n_k, d 64, key padding", (2, 4, 4, 70, 333, 64), {"mask": True}),
    ("window and softcap, d 72 (padded)", (1, 4, 1, 257, 257, 72), {"window": (64, 0), "softcap": 30.0}),
    ("causal n_q > n_k, d 256", (1, 2, 2, 130, 64, 256), {"causal": True}),
]


def build(case, dtype, seed=0):
    _, (b, h, kvh, n_q, n_k, d), o = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g).to(dtype)
    k = torch.randn(b, kvh, n_k, d, generator=g).to(dtype)
    v = torch.randn(b, kvh, n_k, d, generator=g).to(dtype)
    kw = {key: o[key] for key in ("causal", "window", "softcap") if key in o}
    if o.get("mask"):
        lens = torch.tensor([n_k, n_k // 3])
        kw["mask"] = torch.arange(n_k)[None, :] < lens[:, None]
    return q, k, v, kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_tensors_forward_and_backward_match_the_reference(dtype, case):
    q, k, v, kw = build(case, dtype)
    dev = [t.cuda().requires_grad_() for t in (q, k, v)]
    cuda_kw = dict(kw, mask=kw["mask"].cuda()) if "mask" in kw else kw
    out, lse = attn_rs.attention(*dev, return_lse=True, **cuda_kw)
    assert out.is_cuda and out.dtype == dtype and lse.is_cuda and lse.dtype == torch.float32
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, dev, d_out.cuda())
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_in, **kw)
    close(out.cpu(), ref, HALF_FORWARD, f"{case[0]} out")
    ref_grads = torch.autograd.grad(ref, ref_in, d_out.double())
    for name, g, r in zip(["dq", "dk", "dv"], grads, ref_grads):
        assert g.is_cuda and g.dtype == dtype
        close(g.cpu(), r, HALF_BACKWARD, f"{case[0]} {name}")
    if "softcap" not in kw and "window" not in kw:  # SDPA in the same dtype, for scale
        kvh, h = k.shape[1], q.shape[1]
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            *(t.detach() for t in dev), enable_gqa=kvh != h,
            attn_mask=None if "mask" not in kw else cuda_kw["mask"][:, None, None, :],
            is_causal=kw.get("causal", False) and q.shape[2] == k.shape[2])
        if not kw.get("causal") or q.shape[2] == k.shape[2]:
            close(sdpa.cpu(), ref, HALF_FORWARD, f"{case[0]} SDPA")


def test_cuda_refusals_name_the_argument():
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attn_rs.attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="algo"):
        attn_rs.attention(q, q, q, algo="naive")
    bad = q.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="k holds NaN"):
        attn_rs.attention(q, bad, q)
    with pytest.raises(ValueError, match="bias"):
        attn_rs.attention(q, q, q, bias=torch.zeros(1, 2, 8, 8, device="cuda"))
    with pytest.raises(ValueError, match="dropout"):
        attn_rs.attention(q, q, q, dropout=0.1)
