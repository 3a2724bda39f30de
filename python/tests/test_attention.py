"""attn_rs against PyTorch's scaled_dot_product_attention in float64: every stage, forward
and gradients, masks, bias, causal with n_q != n_k, GQA, the score modifiers; the seed's
module through its state_dict; the errors. Bounds are DESIGN.md's f32 rows (normwise, and
30x that elementwise in units of the reference's rms)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attn_rs
from reference import close, reference

ALGOS = ["naive", "chunked", "flash1", "flash2", "ring"]
F32_FORWARD, F32_BACKWARD = 1e-5, 1e-4


def qkv(seed, b, h, kvh, n_q, n_k, d, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k = torch.randn(b, kvh, n_k, d, generator=g)
    v = torch.randn(b, kvh, n_k, d, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


CASES = [
    # (what, (b, h, kvh, n_q, n_k, d), options)
    ("plain", (2, 4, 4, 33, 33, 16), {}),
    ("causal n_q < n_k, GQA 4:2", (2, 4, 2, 19, 70, 24), {"causal": True}),
    ("causal n_q > n_k (rows that see no key)", (1, 2, 2, 40, 17, 8), {"causal": True}),
    ("key padding, cross attention", (3, 2, 1, 21, 45, 32), {"mask": "padding"}),
    ("4-D mask broadcast over heads, bias", (2, 3, 3, 26, 26, 16), {"mask": "full", "bias": True}),
    ("window and softcap, d 70", (1, 2, 1, 50, 64, 70), {"window": (12, 3), "softcap": 5.0}),
    ("ALiBi and a scale", (2, 4, 2, 30, 30, 8), {"alibi": True, "scale": 0.3, "causal": True}),
]


def build(case, seed, grad=False):
    _, (b, h, kvh, n_q, n_k, d), o = case
    q, k, v = qkv(seed, b, h, kvh, n_q, n_k, d, grad)
    g = torch.Generator().manual_seed(seed + 1)
    kw = {k2: o[k2] for k2 in ("causal", "window", "softcap", "scale") if k2 in o}
    if o.get("mask") == "padding":
        lens = torch.randint(1, n_k + 1, (b,), generator=g)
        lens[0] = n_k
        kw["mask"] = torch.arange(n_k)[None, :] < lens[:, None]
    elif o.get("mask") == "full":
        m = torch.rand(b, 1, n_q, n_k, generator=g) > 0.3
        m[0, 0, 3, :] = False  # a fully masked row
        kw["mask"] = m
    if o.get("bias"):
        kw["bias"] = torch.randn(1, h, n_q, n_k, generator=g).requires_grad_(grad)
    if o.get("alibi"):
        kw["alibi"] = torch.tensor([2.0 ** -(i + 1) for i in range(h)])
    return q, k, v, kw


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_sdpa_in_float64(algo, case):
    q, k, v, kw = build(case, 7)
    out, lse = attn_rs.attention(q, k, v, algo=algo, return_lse=True, **kw)
    assert out.dtype == torch.float32 and lse.shape == q.shape[:3]
    close(out, reference(q, k, v, **kw), F32_FORWARD, f"{algo} {case[0]}")


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_sdpa_in_float64(algo, case):
    q, k, v, kw = build(case, 11, grad=True)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    out = attn_rs.attention(q, k, v, algo=algo, **kw)
    leaves = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    ours = torch.autograd.grad(out, leaves, d_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rkw = dict(kw, **({"bias": ref_leaves[3]} if "bias" in kw else {}))
    ref = reference(*ref_leaves[:3], **rkw)
    refs = torch.autograd.grad(ref, ref_leaves, d_out.double())
    for name, g, r in zip(["dq", "dk", "dv", "dbias"], ours, refs):
        close(g, r, F32_BACKWARD, f"{algo} {case[0]} {name}")


@pytest.mark.parametrize("algo", ALGOS)
def test_gradient_by_finite_differences(algo):
    # the directional derivative of <out, w> along a random direction, central differences
    q, k, v = qkv(5, 1, 2, 1, 6, 9, 4, grad=True)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    loss = lambda q, k, v: (attn_rs.attention(q, k, v, algo=algo, causal=True).double() * w).sum()
    grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    g = torch.Generator().manual_seed(4)
    dirs = [torch.randn(t.shape, generator=g) for t in (q, k, v)]
    eps = 1e-2
    with torch.no_grad():
        plus = loss(*(t + eps * d for t, d in zip((q, k, v), dirs)))
        minus = loss(*(t - eps * d for t, d in zip((q, k, v), dirs)))
    fd = (plus - minus).item() / (2 * eps)
    analytic = sum((gr.double() * d.double()).sum().item() for gr, d in zip(grads, dirs))
    assert abs(fd - analytic) <= 2e-3 * max(1.0, abs(analytic)), (fd, analytic)


def test_numpy_in_numpy_out_and_strided_views_read_in_place():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2, 40, 3, 16), dtype=np.float32)  # [b, n, h, d]
    q = base.transpose(0, 2, 1, 3)  # a view with the heads' stride, not contiguous
    assert not q.flags.c_contiguous
    out, lse = attn_rs.attention(q, q, q, causal=True, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and lse.shape == (2, 3, 40)
    qc = np.ascontiguousarray(q)
    np.testing.assert_array_equal(out, attn_rs.attention(qc, qc, qc, causal=True))
    t = torch.from_numpy(qc)
    close(out, reference(t, t, t, causal=True), F32_FORWARD, "numpy")


def test_every_stage_gives_the_same_answer_with_dropout():
    q, k, v = qkv(2, 1, 2, 2, 24, 24, 8)
    outs = [attn_rs.attention(q, k, v, algo=a, dropout=0.2, seed=42) for a in ALGOS]
    plain = attn_rs.attention(q, k, v)
    assert (outs[0] - plain).abs().max() > 1e-3  # dropout did something
    for a, o in zip(ALGOS[1:], outs[1:]):
        close(o, outs[0], F32_FORWARD, f"dropout {a}")


# the seed's module through its state_dict

seed_pkg = pytest.importorskip("memory_efficient_attention_pytorch")


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("algo", [None] + ALGOS)
def test_seed_state_dict_loads_and_gives_the_same_output(memory_efficient, algo):
    torch.manual_seed(0)
    kw = dict(dim=32, heads=4, dim_head=8, causal=True, q_bucket_size=8, k_bucket_size=16)
    seed = seed_pkg.Attention(memory_efficient=memory_efficient, **kw).eval()
    ours = attn_rs.Attention(memory_efficient=memory_efficient, algo=algo, **kw).eval()
    ours.load_state_dict(seed.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 37, 32)
    # the seed's chunked path aligns its causal mask top-left, its naive path bottom-right
    # (as this library does): the two agree where the context is as long as x
    m = 37 if memory_efficient else 45
    context = torch.randn(2, m, 32)
    mask = torch.ones(2, m, dtype=torch.bool)
    mask[1, 30:] = False
    bias = torch.randn(4, 37, m)
    for args in ({}, {"context": context, "mask": mask, "attn_bias": bias}):
        if args and memory_efficient:
            args = dict(args, attn_bias=bias[None].expand(2, -1, -1, -1))
        ref = seed(x, **args)
        got = ours(x, **args)
        close(got, ref, F32_FORWARD, f"module {algo} {sorted(args)}")
    # and the parameters' gradients, against the seed's autograd
    def grads(module):  # .backward(): the seed's checkpointing refuses autograd.grad
        xg = x.clone().requires_grad_()
        module.zero_grad()
        module(xg).sum().backward()
        return [xg.grad] + [p.grad for p in module.parameters()]

    g_ref, g_got = grads(seed), grads(ours)
    for name, a, b in zip(["x", "to_q", "to_kv", "to_out"], g_got, g_ref):
        close(a, b, F32_BACKWARD, f"module gradient {name}")


# bad input: ValueError naming the argument, nothing computed


def bad(match, *args, **kw):
    with pytest.raises(ValueError, match=match):
        attn_rs.attention(*args, **kw)


def test_bad_input_raises_value_error_naming_the_argument():
    q, k, v = qkv(0, 1, 4, 2, 8, 8, 4)
    bad("q must have 4 dimensions", q[0], k, v)
    bad("k must be float32", q, k.double(), v)
    bad("v must be float32", q.numpy(), k.numpy(), v.numpy().astype(np.float64))
    bad("algo must be one of", q, k, v, algo="flash3")
    bad("device must be", q, k, v, device="tpu")
    bad("dropout must be", q, k, v, dropout=1.5)
    bad("mask must be bool", q, k, v, mask=torch.ones(1, 8))
    bad("mask must have", q, k, v, mask=torch.ones(1, 1, 8, dtype=torch.bool))
    bad("all be torch tensors or all NumPy", q, k.numpy(), v)
    nan = k.clone()
    nan[0, 1, 2, 3] = float("nan")
    bad(r"\bk\b", q, nan, v)
    k3 = torch.randn(1, 3, 8, 4)
    bad("heads", q, k3, k3)  # 4 heads over 3 kv heads
    bad("mask", q, k, v, mask=torch.ones(2, 8, dtype=torch.bool))  # batch 2, not 1
    bad("window", q, k, v, window=(1, 2, 3))
    bad("softcap", q, k, v, softcap=-1.0)
    if not attn_rs.cuda_available():
        bad("CUDA device", q, k, v, device="cuda")


def test_stage_names_are_the_libraries():
    assert attn_rs.stage_names() == ALGOS
