"""One config-driven, non-causal transformer for both families (Dream/Qwen2 and LLaDA/OLMo).

Pre-norm RMSNorm blocks, rotate-half RoPE computed in fp32 at explicit positions, grouped-query
attention with optional q/k/v bias, SwiGLU FFN, tied or untied head. Attention is fully
bidirectional over the valid keys. No I/O here: engine/weights.py maps published weight names
onto these modules.

Besides the plain `forward`, the model exposes the two halves of the dual-cache denoising step
(design/engine.md §2.1): `encode` keeps every layer's K (after RoPE) and V, and `step` runs only a
few query rows against that cached context plus the rows' own fresh K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import attend
from engine.config import ModelArgs


@dataclass
class ContextKV:
    """Per-layer keys (after RoPE, at true positions) and values of an encoded sequence."""

    k: list[Tensor]  # each (B, n_kv_heads, L, head_dim)
    v: list[Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 like both reference implementations, scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, L) -> cos, sin (B, 1, L, head_dim) in fp32 (rotate-half layout)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponent / head_dim))  # (D/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, L, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, D) rotated in fp32, returned in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: Tensor,  # (B, L, dim)
        cos: Tensor,
        sin: Tensor,
        key_mask: Tensor | None,  # (B, Lctx + L) bool when past is given, else (B, L)
        past: tuple[Tensor, Tensor] | None = None,  # cached context K/V, each (B, Hkv, Lctx, D)
    ) -> tuple[Tensor, Tensor, Tensor]:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)  # (B, Hq, L, D)
        k = apply_rope(k, cos, sin)  # (B, Hkv, L, D)
        keys, values = k, v
        if past is not None:
            # Non-causal attention ignores key order once RoPE is applied: append at the end.
            keys = torch.cat((past[0], k), dim=2)
            values = torch.cat((past[1], v), dim=2)
        out = attend(q, keys, values, key_mask)  # (B, Hq, L, D)
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        return self.wo(out), k, v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, key_mask, past=None) -> tuple[Tensor, Tensor, Tensor]:
        attn_out, k, v = self.attention(self.attention_norm(x), cos, sin, key_mask, past)
        h = x + attn_out
        return h + self.feed_forward(self.ffn_norm(h)), k, v


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied checkpoints have no head matrix of their own: output() reuses the embedding.
        self.output_proj = (
            None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )

    def forward(self, ids: Tensor, positions: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """ids/positions (B, L) long, key_valid (B, L) bool -> hidden (B, L, dim), final-normed."""
        hidden, _ = self._run(ids, positions, key_valid, ctx=None, keep_kv=False)
        return hidden

    def encode(
        self, ids: Tensor, positions: Tensor, key_valid: Tensor | None = None
    ) -> tuple[Tensor, ContextKV]:
        """The forward pass that also returns every layer's K/V for all L positions."""
        hidden, kv = self._run(ids, positions, key_valid, ctx=None, keep_kv=True)
        return hidden, kv

    def step(
        self,
        ids: Tensor,  # (B, n)
        positions: Tensor,  # (B, n) true positions of the query rows
        query_valid: Tensor,  # (B, n) bool
        ctx: ContextKV,
        ctx_valid: Tensor,  # (B, Lctx) bool
        return_kv: bool = False,
    ) -> Tensor | tuple[Tensor, ContextKV]:
        """Query rows attend to cached context keys (ctx_valid) and their own fresh keys
        (query_valid). Returns hidden (B, n, dim) after the final norm, and with return_kv the
        query rows' own per-layer K/V (B, Hkv, n, D) too."""
        key_mask = torch.cat((ctx_valid, query_valid), dim=1)  # (B, Lctx + n)
        hidden, kv = self._run(ids, positions, key_mask, ctx=ctx, keep_kv=return_kv)
        return (hidden, kv) if return_kv else hidden

    def output(self, hidden: Tensor) -> Tensor:
        """LM head: hidden (..., dim) -> float32 logits (..., vocab)."""
        if self.output_proj is not None:
            return self.output_proj(hidden).float()
        # Tied head: a quantized table projects without materialising a full-precision copy.
        project = getattr(self.tok_embeddings, "project", None)
        if project is not None:
            return project(hidden).float()
        return F.linear(hidden, self.tok_embeddings.weight).float()

    def _run(
        self,
        ids: Tensor,
        positions: Tensor,
        key_mask: Tensor | None,
        ctx: ContextKV | None,
        keep_kv: bool,
    ) -> tuple[Tensor, ContextKV | None]:
        if ids.shape != positions.shape or ids.dim() != 2:
            raise ValueError(f"ids {tuple(ids.shape)} and positions {tuple(positions.shape)} "
                             "must both be (B, L)")
        h = self.tok_embeddings(ids)  # (B, L, dim)
        cos, sin = rope_tables(positions, self.args.head_dim, self.args.rope_theta)
        kept = ContextKV(k=[], v=[]) if keep_kv else None
        for i, layer in enumerate(self.layers):
            past = (ctx.k[i], ctx.v[i]) if ctx is not None else None
            h, k, v = layer(h, cos, sin, key_mask, past)
            if kept is not None:
                kept.k.append(k)
                kept.v.append(v)
        return self.norm(h), kept
