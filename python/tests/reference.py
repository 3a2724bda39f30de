"""What the tests hold the package to: the contract in float64 through PyTorch's SDPA, and
DESIGN.md's bounds (normwise, and 30x that elementwise in units of the reference's rms)."""

import math

import torch
import torch.nn.functional as F


def close(x, ref, tol, what):
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    scale = ref.norm().item()
    rms = scale / math.sqrt(max(ref.numel(), 1))
    err = (x - ref).norm().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: normwise {err / max(scale, 1e-30):.2e} > {tol}"
    worst = (x - ref).abs().max().item()
    assert worst <= 30 * tol * max(rms, 1e-30), f"{what}: elementwise {worst:.2e}"


def keep_mask(n_q, n_k, causal, window):
    """The contract's key ranges as a bool [n_q, n_k]: bottom-right aligned."""
    i = torch.arange(n_q)[:, None] + (n_k - n_q)
    j = torch.arange(n_k)[None, :]
    keep = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
    return keep


def reference(q, k, v, *, causal=False, mask=None, bias=None, scale=None, window=None,
              softcap=None, alibi=None):
    """The contract in float64 through SDPA (an additive float mask carries the bias, ALiBi
    and every mask); the softcap, which SDPA has no place for, by hand. A row every key is
    hidden from gives 0."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n_q, d = q.shape
    kvh, n_k = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    add = torch.zeros(b, h, n_q, n_k, dtype=torch.float64)
    keep = keep_mask(n_q, n_k, causal, window).expand(b, h, n_q, n_k).clone()
    if mask is not None:
        m = mask[:, None, None, :] if mask.ndim == 2 else mask
        keep &= m.expand(b, h, n_q, n_k)
    if bias is not None:
        add = add + bias.double()
    if alibi is not None:
        slopes = alibi.double().reshape(-1 if alibi.ndim == 2 else 1, h)
        i = torch.arange(n_q)[:, None] + (n_k - n_q)
        dist = (i - torch.arange(n_k)[None, :]).abs().double()
        add = add - slopes[:, :, None, None] * dist
    add = add.masked_fill(~keep, -math.inf)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=scale,
                                             enable_gqa=kvh != h)
    else:
        kk = k.repeat_interleave(h // kvh, dim=1)
        vv = v.repeat_interleave(h // kvh, dim=1)
        s = scale * q @ kk.transpose(-1, -2)
        s = softcap * torch.tanh(s / softcap) + add
        out = torch.softmax(s, dim=-1) @ vv
    dead = ~keep.any(dim=-1, keepdim=True)
    return torch.where(dead, torch.zeros_like(out), torch.nan_to_num(out))
