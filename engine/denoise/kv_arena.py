"""The K/V a denoising step attends over, laid out once per request.

Every batch row is one hole length (a span bucket or a candidate) over the same prefix and
suffix. Its columns in the arena:

    [0, context_used)       context: the prefix (without the lead token), then the suffix
    [context_used, C)       padding up to the context bucket C (never attended)
    [C, C + Q)              the query block: entry 0 is the lead token that predicts slot 0 when
                            logits are shifted, then the hole slots; entries past the row's own
                            hole are never attended
    [C + Q]                 scratch: padded query entries of a shrinking step write here
    ... up to `length`      alignment padding (never attended)

Non-causal attention ignores key order once RoPE is applied, so the query block can sit after
the suffix. A step writes its rows' fresh K/V into their own query-block columns and attends over
the whole arena, so the key bias is fixed for the whole request: it is built once, as are the
query block's RoPE tables. Entries a step does not query keep the K/V of their last query: a
committed slot is queried once more with its token in place and then frozen (dKV-Cache's
delayed caching on top of Fast-dLLM's dual cache, design/engine.md §2.1).

All rows share one encode of the longest row (`encode_shared`): a shorter row's suffix sits
`lmax - L` positions further left, which for RoPE keys is an exact rotation. The context states
themselves were computed beside the longest hole's masks, the staleness the dual cache accepts.

Across requests (engine/denoise/context_cache.py) a context can come from an earlier one instead:
`fill_reused` writes the cached K/V of the unchanged tokens (keys re-rotated to their new
positions) and the request's first pass computes the changed ones (engine/denoise/prefill.py);
`snapshot` reads a filled context back out for the cache. Several requests can share one pass:
on CUDA their rows sit in one arena at a common layout (`Layout.placed`), on the CPU each keeps
its own arena and `PackedSlots` runs their rows as one packed sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.denoise.buckets import (
    BATCH_BUCKETS,
    CONTEXT_BUCKETS,
    LINE_SPAN_GUESSES,
    QUERY_BUCKETS,
    SPAN_GUESSES,
)
from engine.denoise.fim import InfillBatch
from engine.model.config import ModelArgs
from engine.model.transformer import ContextKV, KVSlots, Rope, apply_rope, rope_tables

ALIGN = 16  # arena length multiple: keeps the bias rows aligned for the attention kernels


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n, or n itself past the last one."""
    return next((b for b in buckets if b >= n), n)


@dataclass(frozen=True)
class Layout:
    """Where a request's rows live in the arena (see the module docstring)."""

    rows: int  # real batch rows
    batch: int  # rows in the arena (static shapes: padded up to a batch bucket)
    shift: int  # 1 when slot s is predicted from the column before it
    hole_start: int  # column of slot 0 in the infill rows
    lmax: int  # longest hole
    context_used: int  # context tokens per row
    context: int  # C
    query: int  # Q: query-block entries (>= lmax + shift)
    length: int  # total columns

    @classmethod
    def of(cls, batch: InfillBatch, args: ModelArgs, static: bool) -> Layout:
        shift = 1 if args.logit_shift else 0
        lmax = batch.max_hole
        suffix = batch.ids.shape[1] - batch.hole_start - lmax  # the longest row is unpadded
        used = batch.hole_start - shift + suffix
        rows = len(batch.hole_lengths)
        if static:  # one shape per bucket, so one captured graph serves many requests
            n_batch, context = bucket(rows, BATCH_BUCKETS), bucket(used, CONTEXT_BUCKETS)
            query = bucket(lmax, QUERY_BUCKETS) + shift
        else:
            n_batch, context, query = rows, used, lmax + shift
        length = -(-(context + query + 1) // ALIGN) * ALIGN
        return cls(rows=rows, batch=n_batch, shift=shift, hole_start=batch.hole_start,
                   lmax=lmax, context_used=used, context=context, query=query, length=length)

    @property
    def lead(self) -> int:
        """Column (in the infill rows) of query entry 0."""
        return self.hole_start - self.shift

    @property
    def scratch(self) -> int:
        return self.context + self.query

    @property
    def slots(self) -> int:
        """Hole slots the step's logits cover (query entries that predict a slot)."""
        return self.query - self.shift

    @property
    def tail(self) -> int:
        """Context tokens after the hole (suffix and trailing specials)."""
        return self.context_used - self.lead

    def placed(self, context: int, query: int, length: int) -> Layout:
        """This request's rows inside a shared arena whose context region is `context` columns
        and query block `query` entries wide (both at least this request's own)."""
        return Layout(rows=self.rows, batch=self.rows, shift=self.shift,
                      hole_start=self.hole_start, lmax=self.lmax,
                      context_used=self.context_used, context=context, query=query,
                      length=length)


def common_layouts(args: ModelArgs) -> list[Layout]:
    """The static shapes an editor's requests mostly take: the automatic line rows (8/16/24)
    and block rows (8/16/32/64), one row per span guess, at every context bucket of the window."""
    shift = 1 if args.logit_shift else 0
    layouts = []
    for guesses in (LINE_SPAN_GUESSES, SPAN_GUESSES):
        rows, lmax = len(guesses), guesses[-1]
        for context in CONTEXT_BUCKETS:
            if context > args.max_context:
                break
            query = bucket(lmax, QUERY_BUCKETS) + shift
            layouts.append(Layout(
                rows=rows, batch=bucket(rows, BATCH_BUCKETS), shift=shift, hole_start=shift,
                lmax=lmax, context_used=context, context=context, query=query,
                length=-(-(context + query + 1) // ALIGN) * ALIGN))
    return layouts


@dataclass
class KVArena:
    k: list[Tensor]  # per layer (batch, Hkv, length, D)
    v: list[Tensor]
    bias: Tensor  # (batch, 1, 1, length)
    layout: Layout

    def slots(self, at: slice | Tensor) -> KVSlots:
        return KVSlots(self.k, self.v, self.bias, at)

    def select(self, rows: Tensor) -> KVArena:
        """The arena of a subset of its rows (a shrinking step drops finished rows)."""
        return KVArena([k[rows] for k in self.k], [v[rows] for v in self.v], self.bias[rows],
                       self.layout)

    def rows(self, start: int, stop: int, layout: Layout) -> KVArena:
        """A view of rows [start, stop) (writes land in this arena) under `layout`."""
        return KVArena([k[start:stop] for k in self.k], [v[start:stop] for v in self.v],
                       self.bias[start:stop], layout)


@dataclass
class PackedSlots:
    """Several requests' query rows in one pass, each against its own arena.

    The pass's ids are packed as (1, N): group g owns the next rows_g x width_g entries, writes
    their K/V into its own KVSlots and attends over its own arena only. So the matmuls (QKV,
    output, FFN, head) run once over every request's rows while attention costs what each
    request's context costs, with no copy of any arena when requests join or leave."""

    groups: list[tuple[int, int, KVSlots]]  # (rows, width, slots) in packing order

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        """q (1, N, Hq, D), k/v (1, Hkv, N, D) -> (1, N, Hq * D)."""
        outs, start = [], 0
        for rows, width, slots in self.groups:
            n = rows * width
            qg = q[:, start:start + n].reshape(rows, width, *q.shape[2:])
            kg = k[0, :, start:start + n].reshape(k.shape[1], rows, width, -1).transpose(0, 1)
            vg = v[0, :, start:start + n].reshape(v.shape[1], rows, width, -1).transpose(0, 1)
            outs.append(slots.attend(qg, kg, vg, layer).reshape(1, n, -1))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)



def allocate(args: ModelArgs, layout: Layout, dtype: torch.dtype, device) -> KVArena:
    shape = (layout.batch, args.n_kv_heads, layout.length, args.head_dim)
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
    bias = torch.zeros(layout.batch, 1, 1, layout.length, dtype=dtype, device=device)
    return KVArena(k, v, bias, layout)


def key_bias(layout: Layout, hole_lengths: list[int], out: Tensor) -> Tensor:
    """Fill `out` (batch, 1, 1, length) with the request's fixed key bias and return it."""
    lengths = torch.tensor(hole_lengths + [0] * (layout.batch - layout.rows), device=out.device)
    columns = torch.arange(layout.length, device=out.device)[None, :]
    entry = columns - layout.context
    attended = (columns < layout.context_used) | (
        (entry >= 0) & (entry < lengths[:, None] + layout.shift))
    out.zero_()
    out[:, 0, 0].masked_fill_(~attended, float("-inf"))
    return out


def context_columns(layout: Layout, device) -> Tensor:
    """(hole_start + tail,) arena column of each context index (lead ids, then tail ids) in
    the longest row: the prefix in the context region, the lead token(s) in the query block."""
    n_lead, shift = layout.hole_start, layout.shift
    return torch.cat((torch.arange(n_lead - shift, device=device),
                      layout.context + torch.arange(shift, device=device),
                      layout.lead + torch.arange(layout.tail, device=device)))


def context_positions(layout: Layout, hole_lengths: Tensor, index: Tensor) -> Tensor:
    """(rows, n) true positions of context indices `index` in rows of these hole lengths."""
    n_lead = layout.hole_start
    return torch.where(index[None, :] < n_lead, index[None, :],
                       index[None, :] + hole_lengths[:, None])


def fill_reused(arena: KVArena, args: ModelArgs, hole_lengths: Tensor, entry,
                new_index: Tensor, old_index: Tensor) -> None:
    """Write a cached entry's K/V of the reused tokens into every row of `arena` (a view of
    this request's rows), keys rotated from their cached positions to each row's own."""
    if new_index.numel() == 0:
        return
    device = arena.k[0].device
    layout = arena.layout
    new_index, old_index = new_index.to(device), old_index.to(device)
    columns = context_columns(layout, device)[new_index]
    moved = context_positions(layout, hole_lengths, new_index) - entry.position(old_index)[None]
    rotate = rope_tables(moved, args.head_dim, args.rope_theta)  # (rows, n, 1, D)
    rows = hole_lengths.numel()
    for cached, kept, is_key in ((arena.k, entry.k, True), (arena.v, entry.v, False)):
        for buffer, kv in zip(cached, kept, strict=True):  # kv (Hkv, T, D)
            picked = kv[:, old_index].transpose(0, 1)[None].expand(rows, -1, -1, -1)
            if is_key:
                picked = apply_rope(picked, rotate)
            buffer[:rows, :, columns] = picked.transpose(1, 2)


def snapshot(arena: KVArena, row: int) -> tuple[list[Tensor], list[Tensor]]:
    """Copies of one row's context K/V in context-index order (keys at that row's true
    positions): what the context cache keeps. Read right after the first pass, before any
    commit, so the states are those beside an all-MASK hole, as a cold encode's are."""
    columns = context_columns(arena.layout, arena.k[0].device)
    return ([k[row][:, columns].clone() for k in arena.k],
            [v[row][:, columns].clone() for v in arena.v])


def query_positions(layout: Layout, device) -> Tensor:
    """(batch, Q) true positions of the query-block entries (lead, then the hole slots)."""
    entries = torch.arange(layout.query, device=device)
    return (layout.lead + entries).expand(layout.batch, layout.query)


def query_rope(layout: Layout, args: ModelArgs, device) -> Rope:
    return rope_tables(query_positions(layout, device), args.head_dim, args.rope_theta)


def query_ids(layout: Layout, batch: InfillBatch, pad_id: int) -> Tensor:
    """(batch, Q) the query block's token ids: lead, hole (MASK), padding."""
    width = layout.lmax + layout.shift
    ids = batch.ids[:, layout.lead:layout.lead + width]
    ids = F.pad(ids, (0, layout.query - width), value=pad_id)
    if layout.batch > layout.rows:  # inert rows: a copy of row 0, never committed
        ids = torch.cat((ids, ids[:1].expand(layout.batch - layout.rows, -1)))
    return ids


def encode_shared(model, args: ModelArgs, batch: InfillBatch, arena: KVArena) -> Tensor:
    """ONE encode of the longest row fills every row's context and query block; returns that
    row's hidden states (1, T, dim)."""
    layout = arena.layout
    longest = batch.hole_lengths.index(layout.lmax)  # on the host: no device sync
    one = slice(longest, longest + 1)
    hidden, ctx = model.encode(batch.ids[one], batch.positions[one])  # unpadded: no key bias
    lengths = torch.tensor(batch.hole_lengths + [layout.lmax] * (layout.batch - layout.rows),
                           device=batch.ids.device)
    # Rows are laid out over the longest row's columns; a shorter row's suffix moves left.
    rotate = rope_tables((lengths - layout.lmax)[:, None], args.head_dim, args.rope_theta)
    _fill(arena, ctx, suffix_columns=None, rotate=rotate)
    return hidden


def encode_rows(model, batch: InfillBatch, ids: Tensor, arena: KVArena) -> None:
    """Re-encode every real row with its current hole (a refresh): each row's own suffix."""
    layout = arena.layout
    _, ctx = model.encode(ids, batch.positions, batch.key_valid)
    lengths = torch.tensor(batch.hole_lengths, device=ids.device)
    suffix = layout.context_used - layout.lead
    columns = layout.hole_start + lengths[:, None] + torch.arange(suffix, device=ids.device)
    _fill(arena, ctx, suffix_columns=columns, rotate=None)


def _fill(arena: KVArena, ctx: ContextKV, suffix_columns: Tensor | None,
          rotate: Rope | None) -> None:
    layout = arena.layout
    lead, used, c = layout.lead, layout.context_used, layout.context
    n_query = layout.lmax + layout.shift
    n_suffix = used - lead
    start = layout.hole_start + layout.lmax
    rows = ctx.k[0].shape[0] if suffix_columns is not None else layout.batch
    for cached, fresh, is_key in ((arena.k, ctx.k, True), (arena.v, ctx.v, False)):
        for buffer, kv in zip(cached, fresh, strict=True):  # kv (b, Hkv, T, D)
            target = buffer[:rows]
            target[:, :, :lead] = kv[:, :, :lead]
            target[:, :, c:c + n_query] = kv[:, :, lead:lead + n_query]
            if suffix_columns is not None:
                index = suffix_columns[:, None, :, None].expand(-1, kv.shape[1], -1, kv.shape[3])
                target[:, :, lead:used] = kv.gather(2, index)
            elif is_key:  # (1, Hkv, S, D) -> rotated per row
                suffix = kv[:, :, start:start + n_suffix].transpose(1, 2)
                target[:, :, lead:used] = apply_rope(
                    suffix.expand(rows, -1, -1, -1), rotate).transpose(1, 2)
            else:
                target[:, :, lead:used] = kv[:, :, start:start + n_suffix]


@dataclass
class QueryPlan:
    offsets: Tensor  # (b, n) query-block entries to run
    valid: Tensor  # (b, n) bool
    predictor: Tensor  # (b, lmax) index into the n entries of the one that predicts slot j


def plan_queries(masked: Tensor, stale: Tensor, hole_valid: Tensor, shift: int) -> QueryPlan:
    """The entries a shrinking step queries: every masked slot, the entry predicting it, and
    every slot whose token changed since its K/V were written. Slot j is entry j + shift and
    its predictor is entry j. masked/stale/hole_valid (b, lmax) bool. Just as many entries as
    the row that wants the most (one host sync a step: the eager CPU path only)."""
    b, lmax = masked.shape
    want = torch.zeros(b, lmax + shift, dtype=torch.bool, device=masked.device)
    want[:, shift:] |= (masked | stale) & hole_valid
    want[:, :lmax] |= masked
    counts = want.sum(dim=1)  # (b,)
    width = max(1, int(counts.max()))
    order = torch.argsort((~want).to(torch.int8), dim=1, stable=True)  # wanted entries first
    offsets = order[:, :width]
    valid = torch.arange(width, device=masked.device)[None, :] < counts[:, None]
    entry = torch.zeros(b, lmax + shift, dtype=torch.long, device=masked.device)
    entry.scatter_(1, offsets, torch.arange(width, device=masked.device).expand(b, width))
    return QueryPlan(offsets=offsets, valid=valid, predictor=entry[:, :lmax])
