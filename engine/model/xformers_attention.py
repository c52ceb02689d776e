"""Non-causal attention through xformers' memory-efficient kernels (CUDA only, optional).

Same contracts as engine.model.attention: `xformers_attend` as `attend` (q (B, Hq, Lq, D), k/v
(B, Hkv, Lk, D), key_mask (B, Lk) bool or None -> (B, Hq, Lq, D)), and
`grouped_xformers_attention` as `grouped_attention` (q (B, Lq, Hq, D), additive bias
(B, 1, 1, Lk) -> (B, Lq, Hq * D)). GQA uses xformers' 5-D [B, M, G, H, D] layout with K/V
expanded over the H query heads of each group by a stride-0 view (no copy). Key padding becomes
an additive -inf bias broadcast over heads and queries.

engine.model.attention routes CUDA calls here only after `xformers_probe` saw a kernel run; if the
dispatcher still finds no kernel for particular inputs, this falls back to SDPA.
"""

from __future__ import annotations

import functools

import torch

_BIAS_ALIGNMENT = 8  # xformers wants the bias's last-dim storage padded to a multiple of 8


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception:  # ImportError, or a build that fails to load its CUDA extension
        return None
    return xops


def available() -> bool:
    """True when xformers imports and a CUDA device exists (its kernels are CUDA only)."""
    return torch.cuda.is_available() and _xformers_ops() is not None


def xformers_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), key_mask (B, Lk) bool or None -> (B, Hq, Lq, D)."""
    xops = _xformers_ops()
    if xops is None or not q.is_cuda:
        return _sdpa(q, k, v, key_mask)
    try:
        return memory_efficient_attend(xops, q, k, v, key_mask)
    except NotImplementedError:  # the dispatcher found no xformers kernel for this dtype/shape/GPU
        return _sdpa(q, k, v, key_mask)


def grouped_xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """q (B, Lq, Hq, D), k/v (B, Hkv, Lk, D), bias (B, 1, 1, Lk) or None -> (B, Lq, Hq * D)."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    xops = _xformers_ops()
    q5 = q.reshape(batch, q_len, kv_heads, group, head_dim)
    k5 = k.transpose(1, 2).unsqueeze(3).expand(batch, k_len, kv_heads, group, head_dim)
    v5 = v.transpose(1, 2).unsqueeze(3).expand(batch, k_len, kv_heads, group, head_dim)
    attn_bias = None
    if bias is not None:
        aligned = -(-k_len // _BIAS_ALIGNMENT) * _BIAS_ALIGNMENT
        storage = torch.zeros(batch, aligned, dtype=q.dtype, device=q.device)
        storage[:, :k_len] = bias[:, 0, 0]
        attn_bias = storage.as_strided((batch, kv_heads, group, q_len, k_len),
                                       (aligned, 0, 0, 0, 1))
    try:
        out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=attn_bias)
    except NotImplementedError:  # no kernel for this dtype/shape on this GPU
        from engine.model.sdpa import grouped_sdpa

        return grouped_sdpa(q, k, v, bias)
    return out.reshape(batch, q_len, q_heads * head_dim)


def memory_efficient_attend(xops, q, k, v, key_mask):
    """The xformers call itself, with no fallback (tests call this to be sure it ran)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    group = q_heads // kv_heads

    # Query head h belongs to kv head h // group (the repeat_interleave order SDPA uses).
    q5 = q.transpose(1, 2).reshape(batch, q_len, kv_heads, group, head_dim)  # (B, Lq, G, H, D)
    k5 = k.transpose(1, 2).unsqueeze(3).expand(batch, k_len, kv_heads, group, head_dim)
    v5 = v.transpose(1, 2).unsqueeze(3).expand(batch, k_len, kv_heads, group, head_dim)

    bias = None
    any_key = None
    if key_mask is not None:
        # Same contract as the SDPA path: a row with no valid key returns zeros, not NaN.
        any_key = key_mask.any(dim=-1)  # (B,)
        safe_mask = key_mask | ~any_key[:, None]
        bias = _padding_bias(safe_mask, kv_heads, group, q_len, q.dtype)
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)  # (B, Lq, G, H, D)
    out = out.reshape(batch, q_len, q_heads, head_dim).transpose(1, 2)  # (B, Hq, Lq, D)
    if any_key is not None:
        out = out * any_key[:, None, None, None].to(out.dtype)
    return out


def _sdpa(q, k, v, key_mask):
    from engine.model.sdpa import sdpa_attend

    return sdpa_attend(q, k, v, key_mask)


def _padding_bias(
    key_mask: torch.Tensor, kv_heads: int, group: int, q_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """(B, Lk) bool -> additive bias (B, G, H, Lq, Lk): 0 where attended, -inf where padded."""
    batch, k_len = key_mask.shape
    aligned = -(-k_len // _BIAS_ALIGNMENT) * _BIAS_ALIGNMENT
    storage = torch.zeros(batch, aligned, dtype=dtype, device=key_mask.device)
    storage[:, :k_len].masked_fill_(~key_mask, float("-inf"))
    # Broadcast over heads and queries with stride 0, set explicitly: expand() would leave a
    # size-1 dim (group == 1) with an unaligned stride, which the kernel's check rejects.
    return storage.as_strided((batch, kv_heads, group, q_len, k_len), (aligned, 0, 0, 0, 1))
