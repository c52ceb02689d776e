"""Attention through torch SDPA: every device, and the only path inside CUDA graphs.

Both engine/model/attention.py (the seam) and engine/model/xformers_attention.py (its fallback)
use it, so neither imports the other for it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """grouped_attention through torch SDPA (every device; the only path inside CUDA graphs)."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    folded = q.view(batch, q_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(batch, kv_heads, group * q_len, head_dim)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=bias)  # (B, Hkv, G*Lq, D)
    out = out.view(batch, kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, q_heads * head_dim)


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """The portable path: torch SDPA, GQA by head grouping, full bidirectional attention."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
    # All-False rows would give softmax over nothing (NaN): let them attend to everything and
    # zero their output afterwards instead.
    any_key = key_mask.any(dim=-1)  # (B,)
    safe_mask = key_mask | ~any_key[:, None]  # (B, Lk)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=safe_mask[:, None, None, :], is_causal=False, enable_gqa=True
    )  # (B, Hq, Lq, D)
    return out * any_key[:, None, None, None].to(out.dtype)
