"""A request's context K/V into its arena, from scratch or from an earlier request.

Cold: one encode of the longest row fills every row (kv_arena.encode_shared); a one-row
request takes its first logits from that encode. Warm (a ReusePlan from the context cache):
the cached K/V of the unchanged tokens are written in place, re-rotated (kv_arena.fill_reused),
and the request's FIRST pass also runs the changed context tokens (`Join`): they and the hole
compute their K/V in place, attending to each other and to the reused states, which yields the
first logits of every row. That first pass is the cold encode restricted to the tokens that
changed; the reused states saw the old text (the approximation engine/denoise/context_cache.py
bounds).

Either way the context the request ended up with is read back for the cache (`keep_entry`)
right after that first pass, before any slot is committed, so it holds the states beside an
all-MASK hole, as a cold encode's are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.denoise.context_cache import CachedContext, ReusePlan
from engine.denoise.fim import InfillBatch
from engine.denoise.kv_arena import (
    KVArena,
    Layout,
    allocate,
    context_columns,
    context_positions,
    encode_shared,
    fill_reused,
    key_bias,
    query_ids,
    query_positions,
    snapshot,
)
from engine.model.config import ModelArgs
from engine.model.transformer import rope_tables


def masked_head(model, hidden: Tensor, banned_ids: Tensor) -> Tensor:
    """hidden (..., dim) -> float32 logits with the ids never written into a hole at -inf."""
    return model.output(hidden).index_fill_(-1, banned_ids, float("-inf"))


@dataclass
class Join:
    """The changed context tokens a warm request's first pass computes, per row."""

    ids: Tensor  # (rows, m)
    positions: Tensor  # (rows, m)
    columns: Tensor  # (rows, m) arena columns they write

    @property
    def width(self) -> int:
        return self.ids.shape[1]


@dataclass
class Prefilled:
    first: Tensor | None  # (rows, lmax, V) logits, or None: the next pass gives them
    join: Join | None  # warm: the changed tokens the first pass must run
    reused: int  # context tokens whose K/V came from the cache
    computed: int  # context tokens computed for this request
    entry: CachedContext | None  # the context for the cache (warm: once the first pass ran)
    source: CachedContext | None  # the entry it was built from (warm)
    lead: Tensor | None = None  # context ids, for the entry a warm join makes
    tail: Tensor | None = None


def context_ids(batch: InfillBatch) -> tuple[Tensor, Tensor]:
    """(lead, tail) ids of the request's context on the CPU: the longest row's columns
    before and after its hole."""
    longest = batch.hole_lengths.index(batch.max_hole)
    row = batch.ids[longest]
    end = int(batch.key_valid[longest].sum())
    row = row.cpu()
    return row[:batch.hole_start].clone(), row[batch.hole_start + batch.max_hole:end].clone()


def fill(model, args: ModelArgs, batch: InfillBatch, arena: KVArena, banned_ids: Tensor,
         plan: ReusePlan | None, context: tuple[Tensor, Tensor] | None, keep: bool,
         head: bool = True) -> Prefilled:
    """Fill `arena` (this request's rows, its key bias already set): encode (cold) or write the
    reused K/V and return the Join its first pass must add (warm). `context`: the (lead, tail)
    ids, needed to keep the context (keep) or to reuse one (plan)."""
    layout = arena.layout
    if plan is None:
        hidden = encode_shared(model, args, batch, arena)
        first = None
        if head and layout.rows == 1:
            first = masked_head(model, hidden[:, layout.lead:layout.lead + layout.lmax],
                                banned_ids)
        entry = keep_entry(arena, batch, *context, reuses=0) if keep else None
        return Prefilled(first, None, reused=0, computed=layout.hole_start + layout.tail,
                         entry=entry, source=None)
    lead, tail = context
    device = arena.k[0].device
    lengths = torch.tensor(batch.hole_lengths, device=device)
    fill_reused(arena, args, lengths, plan.entry, plan.new_index, plan.old_index)
    changed = plan.changed.to(device)
    rows = layout.rows
    join = Join(ids=torch.cat((lead, tail)).to(device)[changed].expand(rows, -1),
                positions=context_positions(layout, lengths, changed),
                columns=context_columns(layout, device)[changed].expand(rows, -1))
    return Prefilled(None, join, reused=plan.reused, computed=changed.numel(), entry=None,
                     source=plan.entry, lead=lead if keep else None, tail=tail)


def keep_entry(arena: KVArena, batch: InfillBatch, lead: Tensor, tail: Tensor,
               reuses: int) -> CachedContext:
    """The longest row's context, as the cache keeps it."""
    layout = arena.layout
    k, v = snapshot(arena, batch.hole_lengths.index(layout.lmax))
    return CachedContext(lead=lead, tail=tail, hole=layout.lmax, k=k, v=v, reuses=reuses)


def joined_entry(prefilled: Prefilled, arena: KVArena, batch: InfillBatch) -> CachedContext:
    """After a warm request's first pass: its context for the cache."""
    return keep_entry(arena, batch, prefilled.lead, prefilled.tail,
                      reuses=prefilled.source.reuses + 1)


def prefill(model, args: ModelArgs, batch: InfillBatch, arena: KVArena, qids: Tensor,
            banned_ids: Tensor, plan: ReusePlan | None, context: tuple[Tensor, Tensor],
            keep: bool, head: bool = True) -> Prefilled:
    """`fill`, then (warm) the first pass of this request alone: the changed tokens and the
    whole query block (qids (rows, Q)). Used where no shared pass follows (a speculation, the
    agreement measure); `first` holds the first logits when `head`."""
    done = fill(model, args, batch, arena, banned_ids, plan, context, keep, head)
    if done.join is None:
        return done
    layout, join = arena.layout, done.join
    device = qids.device
    rows = layout.rows
    positions = torch.cat((join.positions, query_positions(layout, device)[:rows]), dim=1)
    columns = torch.cat((join.columns, (layout.context + torch.arange(
        layout.query, device=device)).expand(rows, -1)), dim=1)
    rope = rope_tables(positions, args.head_dim, args.rope_theta)
    hidden = model.step(torch.cat((join.ids, qids[:rows]), dim=1), rope, arena.slots(columns))
    m = join.width
    if head:
        done.first = masked_head(model, hidden[:, m:m + layout.lmax], banned_ids)
    if keep:
        done.entry = joined_entry(done, arena, batch)
    done.join = None
    return done


def entry_alone(model, args: ModelArgs, batch: InfillBatch, banned_ids: Tensor,
                plan: ReusePlan | None, dtype: torch.dtype, device) -> CachedContext:
    """`batch`'s context for the cache, prefilled outside the denoising loop on an eager arena
    of its own (no logits): warm from `plan` (a speculation) or, with None, the cold encode
    (a refresh)."""
    layout = Layout.of(batch, args, static=False)
    arena = allocate(args, layout, dtype, device)
    key_bias(layout, batch.hole_lengths, arena.bias)
    qids = query_ids(layout, batch, args.pad_token_id)
    return prefill(model, args, batch, arena, qids, banned_ids, plan, context_ids(batch),
                   keep=True, head=False).entry
