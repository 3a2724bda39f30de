"""attn_rs: memory-efficient attention from the Rust workspace, on NumPy arrays and PyTorch
tensors.

    import attn_rs
    out = attn_rs.attention(q, k, v, causal=True)            # [batch, heads, n_q, head_dim]
    out, lse = attn_rs.attention(q, k, v, return_lse=True)   # lse: [batch, heads, n_q]

Every stage of the workspace computes the same function (the contract of the book's first
chapter): ``algo`` picks the algorithm — "naive", "chunked", "flash1" or "flash2" (the
default, the fastest). On torch tensors the call is differentiable: its backward is the
stage's own backward pass. ``Attention`` is a drop-in for the seed project's module
(``memory_efficient_attention_pytorch.Attention``): same constructor, same forward, same
parameter names, so its ``state_dict`` loads as it is.
"""

from . import _native
from ._api import attention, stage_names, cuda_available
from ._module import Attention

__all__ = ["attention", "Attention", "stage_names", "cuda_available"]
