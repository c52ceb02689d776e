"""One config-driven, non-causal transformer for both families (Dream/Qwen2 and LLaDA/OLMo).

Pre-norm RMSNorm blocks, rotate-half RoPE computed in fp32 at explicit positions, grouped-query
attention with optional q/k/v bias, SwiGLU FFN, tied or untied head. Attention is fully
bidirectional over the valid keys. No I/O here: engine/model/weights.py maps published weight names
onto these modules (and fuses q/k/v and gate/up into one matrix each at load).

The pass is kept lean because a denoising step runs it dozens of times per request with few
query rows, where kernel launches, not FLOPs, set the time (design/engine.md §6):
- one QKV matmul (with its bias) and one gate/up matmul per layer;
- `F.rms_norm`; RoPE as `x * cos + roll(x) * sin` with the rotate-half sign folded into `sin`,
  from tables the caller builds once (per request for a denoising step);
- the key padding mask becomes one additive bias per pass, shared by every layer;
- grouped-query attention folds each group's query heads into the query length, so SDPA sees
  plain multi-head attention over the kv heads (no K/V repeat, any SDPA backend);
- `step` writes its rows' fresh K/V into the caller's buffers in place (one op per tensor per
  layer) and attends over the whole buffer: no concatenation of the cache each step.

Three entry points share the layers: `forward` (whole rows, no cache: training and the reference
path), `encode` (the same, keeping every layer's K/V) and `step` (a few query rows against
cached K/V, design/engine.md §2.1).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.attention import grouped_attention
from engine.model.config import ModelArgs


class EncodeInterrupted(Exception):
    """Raised between two layers of an encode by the ENCODE_GATE of the work running it."""


# Set by the worker (engine/denoise/batch_worker.py) around an encode or a pass: called with the
# hidden
# states between layers, it raises EncodeInterrupted when the work is no longer wanted (a
# background re-encode when a request is waiting; a request's encode or pass once it was
# cancelled), so the work stops within one layer, not one encode or pass.
ENCODE_GATE: contextvars.ContextVar[Callable[[Tensor], None] | None] = \
    contextvars.ContextVar("encode_gate", default=None)
# The same between the layers of `step` (a denoising or warm-prefill pass), set only around a
# request's work: a started background speculation (one step) still runs to its end.
STEP_GATE: contextvars.ContextVar[Callable[[Tensor], None] | None] = \
    contextvars.ContextVar("step_gate", default=None)


@dataclass
class ContextKV:
    """Per-layer keys (after RoPE, at true positions) and values of an encoded sequence."""

    k: list[Tensor]  # each (B, n_kv_heads, L, head_dim)
    v: list[Tensor]


@dataclass
class Rope:
    """RoPE angles for a set of positions, in fp32, broadcast over heads."""

    cos: Tensor  # (B, L, 1, D)
    sin: Tensor  # (B, L, 1, D) with rotate-half's sign folded in: [-sin, +sin] halves

    def select(self, rows: Tensor) -> Rope:
        return Rope(self.cos[rows], self.sin[rows])


@dataclass
class KVSlots:
    """What a step attends over: per-layer K/V buffers, the key bias, and where the step's own
    rows write their fresh K/V (`at`: one slice of columns for every row, or (B, n) columns)."""

    k: list[Tensor]  # each (B, n_kv_heads, Lk, head_dim)
    v: list[Tensor]
    bias: Tensor  # (B, 1, 1, Lk) additive: 0 where a key is attended, -inf where it is not
    at: slice | Tensor

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        """Write this step's k/v (B, Hkv, L, D) in place, attend q (B, L, Hq, D) over the whole
        buffer -> (B, L, Hq * D). (engine/kv_arena.PackedSlots: several arenas in one pass.)"""
        keys, values = self.k[layer], self.v[layer]
        if isinstance(self.at, slice):
            keys[:, :, self.at] = k
            values[:, :, self.at] = v
        else:
            index = self.at[:, None, :, None].expand_as(k)
            keys.scatter_(2, index, k)
            values.scatter_(2, index, v)
        return grouped_attention(q, keys, values, self.bias)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> Rope:
    """positions (B, L) -> Rope with (B, L, 1, head_dim) tables (rotate-half layout)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponent / head_dim))  # (D/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, L, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return Rope(cos=torch.cat((cos, cos), dim=-1)[:, :, None],
                sin=torch.cat((-sin, sin), dim=-1)[:, :, None])


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """x (B, L, H, D) rotated in fp32, returned in x's dtype.

    rotate_half(x) = cat(-x2, x1) = roll(x, D/2) with the first half negated; the negation
    lives in rope.sin, so a rotation is three ops."""
    x32 = x.float()
    out = x32 * rope.cos
    out.addcmul_(x32.roll(x32.shape[-1] // 2, dims=-1), rope.sin)
    return out.to(x.dtype)


def attention_bias(key_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Lk) bool -> (B, 1, 1, Lk) additive bias. A row with no valid key attends to all of
    them (finite garbage instead of NaN; such rows are padding whose output nobody reads)."""
    any_key = key_valid.any(dim=-1, keepdim=True)
    attended = key_valid | ~any_key
    bias = torch.zeros(attended.shape, dtype=dtype, device=key_valid.device)
    return bias.masked_fill_(~attended, float("-inf"))[:, None, None, :]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.qk_width = (args.n_heads + args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, self.qk_width + args.n_kv_heads * args.head_dim,
                              bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, rope: Rope, bias: Tensor | None, slots: KVSlots | None,
                layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) -> (out (B, L, dim), k, v (B, Hkv, L, D) of these rows)."""
        bsz, seqlen, _ = x.shape
        qkv = self.wqkv(x)  # (B, L, (Hq + 2 Hkv) D)
        heads = self.n_heads + self.n_kv_heads
        qk = apply_rope(qkv[..., :self.qk_width].view(bsz, seqlen, heads, self.head_dim), rope)
        q = qk[:, :, :self.n_heads]  # (B, L, Hq, D)
        k = qk[:, :, self.n_heads:].transpose(1, 2)  # (B, Hkv, L, D)
        v = qkv[..., self.qk_width:].view(bsz, seqlen, self.n_kv_heads,
                                          self.head_dim).transpose(1, 2)
        if slots is not None:  # write this step's K/V in place, attend over the whole buffer
            return self.wo(slots.attend(q, k, v, layer)), k, v
        return self.wo(grouped_attention(q, k, v, bias)), k, v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(gate x) * up x), gate and up in one matrix (w13 = [w1; w3])."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, rope, bias, slots, layer) -> tuple[Tensor, Tensor, Tensor]:
        attn_out, k, v = self.attention(self.attention_norm(x), rope, bias, slots, layer)
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
        hidden, _ = self._whole_rows(ids, positions, key_valid, keep_kv=False)
        return hidden

    def encode(
        self, ids: Tensor, positions: Tensor, key_valid: Tensor | None = None
    ) -> tuple[Tensor, ContextKV]:
        """The forward pass that also returns every layer's K/V for all L positions."""
        hidden, kv = self._whole_rows(ids, positions, key_valid, keep_kv=True)
        return hidden, kv

    def step(self, ids: Tensor, rope: Rope, slots: KVSlots) -> Tensor:
        """The denoising pass: query rows ids (B, n) at the positions `rope` was built for
        write their K/V into `slots` and attend over all of it -> hidden (B, n, dim).
        Eager and CUDA-graphed runs call this same function."""
        h = self.tok_embeddings(ids)
        gate = STEP_GATE.get()  # (a captured graph replays without calling it)
        for i, layer in enumerate(self.layers):
            if gate is not None and i:
                gate(h)
            h, _, _ = layer(h, rope, None, slots, i)
        return self.norm(h)

    def output(self, hidden: Tensor) -> Tensor:
        """LM head: hidden (..., dim) -> float32 logits (..., vocab)."""
        if self.output_proj is not None:
            return self.output_proj(hidden).float()
        # Tied head: a quantized table projects without materialising a full-precision copy.
        project = getattr(self.tok_embeddings, "project", None)
        if project is not None:
            return project(hidden).float()
        return F.linear(hidden, self.tok_embeddings.weight).float()

    def _whole_rows(self, ids: Tensor, positions: Tensor, key_valid: Tensor | None,
                    keep_kv: bool) -> tuple[Tensor, ContextKV | None]:
        if ids.shape != positions.shape or ids.dim() != 2:
            raise ValueError(f"ids {tuple(ids.shape)} and positions {tuple(positions.shape)} "
                             "must both be (B, L)")
        h = self.tok_embeddings(ids)  # (B, L, dim)
        rope = rope_tables(positions, self.args.head_dim, self.args.rope_theta)
        # Unpadded rows need no bias at all, which lets SDPA pick its fastest kernel.
        bias = None if key_valid is None else attention_bias(key_valid, h.dtype)
        kept = ContextKV(k=[], v=[]) if keep_kv else None
        gate = ENCODE_GATE.get()
        for i, layer in enumerate(self.layers):
            if gate is not None and i:
                gate(h)
            h, k, v = layer(h, rope, bias, None, i)
            if kept is not None:
                kept.k.append(k)
                kept.v.append(v)
        return self.norm(h), kept
