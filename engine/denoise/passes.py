"""The denoising pass as a function of fixed buffers: run eagerly, or captured as a CUDA graph.

A `StaticPass` owns the inputs of one shape (query ids, the query block's RoPE tables, the key
bias) and holds the arena it attends over. `logits()` runs `model.step` over them, then the head
on the entries that predict hole slots. The graphed run replays exactly that function, captured
once per shape (engine/denoise/graphs.py), so eager and graphed passes cannot drift apart.

The denoising loop writes into `qids` between passes; the batch fills `rope`, `bias` and the
arena when requests join or leave (engine/denoise/static_batch.py), never between other passes.

Where a request's logits come from is a `Source`, one protocol for the three kinds: a member of
the static batch (engine/denoise/static_batch.py), `ShrinkingSource` (the CPU default: its own
arena, only the entries that matter, packed with other requests' by `packed_logits`) and
`UncachedSource` (a full forward each pass, the reference). Sources of one `group` share one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from engine.denoise.context_cache import ReusePlan
from engine.denoise.kv_arena import (
    KVArena,
    Layout,
    PackedSlots,
    allocate,
    encode_rows,
    key_bias,
    plan_queries,
    query_ids,
    query_rope,
)
from engine.denoise.prefill import Prefilled, fill, joined_entry, masked_head
from engine.model.attention import SDPA_ONLY
from engine.model.config import ModelArgs
from engine.model.transformer import KVSlots, Rope, rope_tables

WARMUP_RUNS = 2  # cuBLAS/attention workspaces are allocated on the first runs, not in a graph


class StaticPass:
    """One fixed shape's pass. `refresh` > 0 makes it a join pass: `refresh` more entries per
    row before the query block, for the changed context tokens of requests whose context came
    from the cache (engine/denoise/prefill.py); they write their K/V at the columns in `columns`."""

    def __init__(self, model, args: ModelArgs, arena: KVArena, banned_ids: Tensor,
                 refresh: int = 0):
        layout = arena.layout
        device = banned_ids.device
        self.model = model
        self.layout: Layout = layout
        self.arena = arena
        self.banned_ids = banned_ids
        self.refresh = refresh
        width = refresh + layout.query
        self.qids = torch.zeros(layout.batch, width, dtype=torch.long, device=device)
        table = (layout.batch, width, 1, args.head_dim)
        self.rope = Rope(torch.zeros(table, device=device), torch.zeros(table, device=device))
        self.columns: Tensor | None = None
        if refresh:
            self.columns = torch.full((layout.batch, width), layout.scratch, dtype=torch.long,
                                      device=device)
            self.columns[:, refresh:] = layout.context + torch.arange(layout.query,
                                                                      device=device)
            self._slots = arena.slots(self.columns)
        else:
            self._slots = arena.slots(slice(layout.context, layout.context + layout.query))
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None

    @property
    def bias(self) -> Tensor:
        return self.arena.bias

    @property
    def graphed(self) -> bool:
        return self._graph is not None

    def logits(self) -> Tensor:
        """(batch, slots, V) float32 logits of the pass over the current buffers. A graphed
        pass returns the same output tensor every time: read it before the next pass."""
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        return self._forward()

    def _forward(self) -> Tensor:
        token = SDPA_ONLY.set(True)
        try:
            hidden = self.model.step(self.qids, self.rope, self._slots)
        finally:
            SDPA_ONLY.reset(token)
        start = self.refresh
        return masked_head(self.model, hidden[:, start:start + self.layout.slots],
                           self.banned_ids)

    def capture(self, pool) -> None:
        """Record the pass as a CUDA graph in the shared memory pool. Warm-up runs go on a side
        stream first (the usual capture recipe); they only write the arena's query block."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: what other threads do meanwhile cannot invalidate this capture (they
        # should not touch the device anyway: engine/engine.py builds jobs on the CPU).
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self._logits = self._forward()
        self._graph = graph


# ---- where a request's logits come from: one protocol, one loop (engine/denoise/loop.py)


class InFlight(Protocol):
    """What a pass reads of a request in flight (engine/denoise/loop.RequestState)."""

    source: Source
    masked: Tensor  # (B, lmax) still-masked slots
    stale: Tensor  # (B, lmax) slots changed since their K/V were written
    rows: Tensor | None  # the rows still denoised (None: all)
    greedy: bool  # every row argmax: logits of the open slots are enough


class PassGroup(Protocol):
    def run(self, requests: list[InFlight]) -> list[Tensor | SlotLogits]:
        """ONE pass for these requests (all of this group's) -> each one's logits."""


class Source(Protocol):
    """One request's logits, pass after pass. The loop writes its hole in place between passes;
    the next pass reads it."""

    group: PassGroup  # the requests whose sources share a group share a pass
    shrinks: bool  # finished rows leave its pass (`select`); it re-queries only what changed
    hole: Tensor  # (rows, lmax) the request's hole, where the next pass reads it
    first: Tensor | None  # logits its prefill already made (its first pass is free)
    prefilled: Prefilled | None  # how its context was filled (reused tokens, the cache entry)

    def new_entry(self):
        """A warm request's context for the cache once its first pass ran (then None)."""

    def select(self, local: Tensor) -> None:
        """Keep only these of its rows in the pass (shrinking sources only)."""

    def refresh(self, ids: Tensor) -> None:
        """Re-encode its whole context with these ids (the holes as they are now)."""

    def leave(self) -> None:
        """It left the loop: free what it holds in a shared pass."""


@dataclass
class Query:
    """One request's share of a shrinking pass: the entries it queries and where they write."""

    ids: Tensor  # (b, w)
    rope: Rope  # (b, w, 1, D)
    slots: KVSlots  # its arena; `at` (b, w) columns
    predictor: Tensor  # (b, lmax) index into the w entries of the one that predicts slot j
    open: Tensor | None = None  # (b, lmax) bool: the slots that need logits (None: every slot)


@dataclass
class SlotLogits:
    """Logits of some slots of a request's rows: values[k] for (row[k], slot[k]). A greedy
    request needs logits only for its still-masked slots; the head and the draw cost what
    those cost (about half the hole, on average over a request)."""

    values: Tensor  # (K, V)
    row: Tensor  # (K,)
    slot: Tensor  # (K,)


class ShrinkingSource:
    """Eager path for the CPU: each pass queries only the entries that matter (open slots,
    their predictors, slots that just changed) and finished rows leave the batch. A CPU pass
    costs what its rows cost, so shrinking them is where the time goes; a GPU pass costs the
    same for 1 or 64 rows, which is why CUDA takes the static batch instead. Each request keeps
    its own arena; requests in flight together share passes through `packed_logits`."""

    shrinks = True

    def __init__(self, model, args: ModelArgs, batch, layout: Layout, banned_ids: Tensor,
                 dtype: torch.dtype, plan: ReusePlan | None = None,
                 context: tuple[Tensor, Tensor] | None = None, keep: bool = False):
        device = batch.ids.device
        self.model, self.args, self.batch, self.layout = model, args, batch, layout
        self.banned_ids, self.dtype = banned_ids, dtype
        self.arena = allocate(args, layout, dtype, device)
        key_bias(layout, batch.hole_lengths, self.arena.bias)
        self.rope = query_rope(layout, args, device)
        self.qids = query_ids(layout, batch, args.pad_token_id)
        self.prefilled = fill(model, args, batch, self.arena, banned_ids, plan, context, keep)
        self.hole = self.qids[:, layout.shift:layout.shift + layout.lmax]  # (B, lmax)
        self.first = self.prefilled.first
        self._all_rows = torch.arange(layout.rows, device=device)[:, None]
        self._joined = False

    @property
    def group(self) -> PassGroup:
        return PACKED

    def query(self, masked: Tensor, stale: Tensor, rows: Tensor | None,
              open_only: bool = False) -> Query:
        """The entries of the open `rows` (None: all) this pass must run. open_only: logits
        for the still-masked slots only (SlotLogits)."""
        layout = self.layout
        if self.prefilled.join is not None:  # the first pass of a warm request
            return self._join_query(stale)
        pick = slice(None) if rows is None else rows
        plan = plan_queries(masked[pick], stale[pick], self.batch.hole_valid[pick], layout.shift)
        at = (self._all_rows if rows is None else rows[:, None], plan.offsets)
        columns = torch.where(plan.valid, layout.context + plan.offsets, layout.scratch)
        stale[pick] = False
        return Query(self.qids[at], Rope(self.rope.cos[at], self.rope.sin[at]),
                     self.arena.slots(columns), plan.predictor,
                     masked[pick] if open_only else None)

    def _join_query(self, stale: Tensor) -> Query:
        """The changed context tokens, then the whole query block (every slot is masked)."""
        layout, join, args = self.layout, self.prefilled.join, self.args
        self.prefilled.join = None
        self._joined = True
        device, rows, m = self.qids.device, layout.rows, join.width
        entries = layout.context + torch.arange(layout.query, device=device)
        changed = rope_tables(join.positions, args.head_dim, args.rope_theta)
        rope = Rope(torch.cat((changed.cos, self.rope.cos), dim=1),
                    torch.cat((changed.sin, self.rope.sin), dim=1))
        predictor = (m + torch.arange(layout.lmax, device=device)).expand(rows, -1)
        stale.zero_()
        return Query(torch.cat((join.ids, self.qids), dim=1), rope,
                     self.arena.slots(torch.cat((join.columns, entries.expand(rows, -1)), 1)),
                     predictor)

    def new_entry(self):
        """A warm request's context for the cache, once its first pass ran (then None)."""
        if not self._joined or self.prefilled.lead is None:
            return None
        self._joined = False
        return joined_entry(self.prefilled, self.arena, self.batch)

    def select(self, local: Tensor) -> None:
        self.arena = self.arena.select(local)

    def refresh(self, ids: Tensor) -> None:
        """Every row again, each from its own encode."""
        self.arena = allocate(self.args, self.layout, self.dtype, ids.device)
        key_bias(self.layout, self.batch.hole_lengths, self.arena.bias)
        encode_rows(self.model, self.batch, ids, self.arena)

    def leave(self) -> None:
        pass  # its arena is its own


class _Packed:
    """Every shrinking source in flight: one packed pass (`packed_logits`)."""

    def run(self, requests: list[InFlight]) -> list[Tensor | SlotLogits]:
        source = requests[0].source
        queries = [r.source.query(r.masked, r.stale, r.rows, r.greedy) for r in requests]
        return packed_logits(source.model, source.banned_ids, queries)


PACKED = _Packed()


def _head_rows(hidden: Tensor, q: Query) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """(b, w, dim) hidden states -> the (n, dim) rows whose logits q needs: the entry that
    predicts each slot (each open slot when q.open is set, with their (row, slot))."""
    if q.open is None:
        index = q.predictor[..., None].expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index).reshape(-1, hidden.shape[-1]), None
    row, slot = q.open.nonzero(as_tuple=True)  # a host sync: the shrinking path syncs anyway
    return hidden[row, q.predictor[row, slot]], (row, slot)


def _shaped(logits: Tensor, q: Query, where: tuple[Tensor, Tensor] | None):
    if where is None:
        return logits.reshape(q.predictor.shape[0], q.predictor.shape[1], -1)
    return SlotLogits(logits, *where)


def packed_logits(model, banned_ids: Tensor, queries: list[Query]) -> list[Tensor | SlotLogits]:
    """ONE pass for several requests' queries: their entries packed into one sequence (the
    matmuls and the head run once), attention per request over its own arena (PackedSlots).
    Each request gets (b, lmax, V) logits, or SlotLogits when its query asks for open slots."""
    if len(queries) == 1:
        q = queries[0]
        picked, where = _head_rows(model.step(q.ids, q.rope, q.slots), q)
        return [_shaped(masked_head(model, picked, banned_ids), q, where)]
    ids = torch.cat([q.ids.reshape(1, -1) for q in queries], dim=1)
    dim = queries[0].rope.cos.shape[-1]
    cos = torch.cat([q.rope.cos.reshape(1, -1, 1, dim) for q in queries], dim=1)
    sin = torch.cat([q.rope.sin.reshape(1, -1, 1, dim) for q in queries], dim=1)
    shapes = [tuple(q.ids.shape) for q in queries]
    hidden = model.step(ids, Rope(cos, sin), PackedSlots(
        [(b, w, q.slots) for (b, w), q in zip(shapes, queries, strict=True)]))
    picked, wheres, start = [], [], 0
    for (b, w), q in zip(shapes, queries, strict=True):
        rows, where = _head_rows(hidden[0, start:start + b * w].reshape(b, w, -1), q)
        picked.append(rows)
        wheres.append(where)
        start += b * w
    logits = masked_head(model, torch.cat(picked), banned_ids)
    return [_shaped(chunk, q, where) for chunk, q, where in
            zip(logits.split([p.shape[0] for p in picked]), queries, wheres, strict=True)]


class UncachedSource:
    """The reference path: a full forward over whole rows for every pass."""

    shrinks = False

    def __init__(self, model, batch, layout: Layout, banned_ids: Tensor):
        self.model, self.batch, self.layout, self.banned_ids = model, batch, layout, banned_ids
        self.ids = batch.ids.clone()
        self.hole = self.ids[:, layout.hole_start:layout.hole_start + layout.lmax]
        self.first = None
        self.prefilled = None

    @property
    def group(self) -> PassGroup:
        return self  # a pass of its own

    def run(self, requests: list[InFlight]) -> list[Tensor]:
        return [self.logits(r.masked, r.stale, r.rows) for r in requests]

    def new_entry(self):
        return None

    def select(self, local: Tensor) -> None:
        pass  # never called: it does not shrink

    def leave(self) -> None:
        pass

    def logits(self, masked: Tensor, stale: Tensor, rows: Tensor | None) -> Tensor:
        hidden = self.model(self.ids, self.batch.positions, self.batch.key_valid)
        lead = self.layout.lead
        return masked_head(self.model, hidden[:, lead:lead + self.layout.lmax], self.banned_ids)

    def refresh(self, ids: Tensor) -> None:
        pass  # every pass is a fresh forward already
