"""Attention: the seed project's module (memory_efficient_attention_pytorch.Attention) over
the workspace's stages — the same constructor, forward and parameter names."""

import torch
from torch import nn

from ._api import attention


class Attention(nn.Module):
    """Multi-head attention: x `[b, n, dim]` → q = to_q(x); k, v = to_kv(context) halved;
    heads `[b, heads, n, dim_head]`; a stage's attention; to_out of the merged heads.

    The parameters are the seed's (``to_q``, ``to_kv``, ``to_out``, no biases), so a
    ``state_dict`` saved from ``memory_efficient_attention_pytorch.Attention`` loads as it is
    and gives the same output. ``algo`` picks the stage; left out, the seed's switch does:
    ``memory_efficient=True`` is chunked attention (Rabe & Staats, with ``q_bucket_size`` and
    ``k_bucket_size`` as its chunks), ``False`` naive attention. Every stage computes the same
    function, so ``algo="flash2"`` is the fast choice with the same answer.

    Two differences from the seed, both where it is undefined or random: a query row that
    the mask hides every key from gets 0 here (the seed averages the values), and dropout
    draws its own weights (by the library's hash of ``dropout_seed`` and the position, not
    torch's generator).
    """

    def __init__(self, dim, *, heads=8, dim_head=64, dropout=0.0, causal=False,
                 memory_efficient=False, q_bucket_size=512, k_bucket_size=1024, algo=None,
                 dropout_seed=0):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.dropout_seed = dropout_seed
        inner_dim = heads * dim_head

        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

        self.memory_efficient = memory_efficient
        self.q_bucket_size = q_bucket_size
        self.k_bucket_size = k_bucket_size
        self.algo = algo

    def _split_heads(self, t):
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x, context=None, mask=None, attn_bias=None, memory_efficient=None,
                q_bucket_size=None, k_bucket_size=None):
        memory_efficient = self.memory_efficient if memory_efficient is None else memory_efficient
        q_bucket_size = self.q_bucket_size if q_bucket_size is None else q_bucket_size
        k_bucket_size = self.k_bucket_size if k_bucket_size is None else k_bucket_size
        algo = self.algo or ("chunked" if memory_efficient else "naive")
        context = x if context is None else context

        q = self._split_heads(self.to_q(x))
        k, v = (self._split_heads(t) for t in self.to_kv(context).chunk(2, dim=-1))
        out = attention(
            q, k, v, algo=algo, causal=self.causal, mask=mask, bias=attn_bias,
            dropout=self.dropout if self.training else 0.0, seed=self.dropout_seed,
            q_block=q_bucket_size, k_block=k_bucket_size,
        )
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))
