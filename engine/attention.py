"""Non-causal grouped-query attention behind one seam.

`attend` is the only place the model calls an attention kernel. On CUDA it prefers xformers
(engine/xformers_attention.py, optional); everywhere else, and whenever that module is missing,
it uses PyTorch SDPA with a boolean key mask (True = attend) and `is_causal=False`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

try:  # optional CUDA fast path; its absence is normal on CPU machines
    from engine.xformers_attention import xformers_attend

    XFORMERS_AVAILABLE = True
except (ImportError, OSError):  # OSError: xformers present but its CUDA libraries are not
    xformers_attend = None
    XFORMERS_AVAILABLE = False


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), key_mask (B, Lk) bool or None -> (B, Hq, Lq, D).

    Every query sees every key where key_mask is True. A row whose keys are all masked returns
    zeros rather than NaN, so padded batch rows cannot poison anything downstream.
    """
    if XFORMERS_AVAILABLE and q.is_cuda:
        return xformers_attend(q, k, v, key_mask)
    return sdpa_attend(q, k, v, key_mask)


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
