"""The denoising pass as a function of fixed buffers: run eagerly, or captured as a CUDA graph.

A `StaticPass` owns the inputs of one shape (query ids, the query block's RoPE tables, the key
bias) and holds the arena it attends over. `logits()` runs `model.step` over them, then the head
on the entries that predict hole slots. The graphed run replays exactly that function, captured
once per shape (engine/graphs.py), so eager and graphed passes cannot drift apart.

The denoising loop writes into `qids` between passes; the request fills `rope`, `bias` and the
arena once, before the first pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.attention import SDPA_ONLY
from engine.config import ModelArgs
from engine.kv_arena import (
    KVArena,
    Layout,
    allocate,
    encode_rows,
    encode_shared,
    key_bias,
    plan_queries,
    query_ids,
    query_rope,
)
from engine.model import Rope

WARMUP_RUNS = 2  # cuBLAS/attention workspaces are allocated on the first runs, not in a graph


def masked_head(model, hidden: Tensor, banned_ids: Tensor) -> Tensor:
    """hidden (..., dim) -> float32 logits with the ids never written into a hole at -inf."""
    return model.output(hidden).index_fill_(-1, banned_ids, float("-inf"))


class StaticPass:
    def __init__(self, model, args: ModelArgs, arena: KVArena, banned_ids: Tensor):
        layout = arena.layout
        device = banned_ids.device
        self.model = model
        self.layout: Layout = layout
        self.arena = arena
        self.banned_ids = banned_ids
        self.qids = torch.zeros(layout.batch, layout.query, dtype=torch.long, device=device)
        table = (layout.batch, layout.query, 1, args.head_dim)
        self.rope = Rope(torch.zeros(table, device=device), torch.zeros(table, device=device))
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
        return masked_head(self.model, hidden[:, :self.layout.slots], self.banned_ids)

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
        with torch.cuda.graph(graph, pool=pool):
            self._logits = self._forward()
        self._graph = graph


# ---- where a request's logits come from: one object per strategy, one loop (engine/denoiser.py)


def _first_from_encode(model, hidden: Tensor, layout: Layout, banned_ids: Tensor,
                       width: int) -> Tensor | None:
    """A one-row request's first logits straight from its encode (the encode saw exactly
    this row), saving a pass; None for several rows, whose encode was the longest row's."""
    if layout.rows != 1:
        return None
    logits = masked_head(model, hidden[:, layout.lead:layout.lead + layout.lmax], banned_ids)
    if layout.batch == 1 and width == layout.lmax:
        return logits
    padded = logits.new_zeros(layout.batch, width, logits.shape[-1])  # inert rows and entries
    padded[:1, :layout.lmax] = logits
    return padded


class StaticSource:
    """Fixed shapes: every pass queries the whole query block, finished rows stay (masked).
    On CUDA the pass is a replayed graph; no host sync happens inside it."""

    shrinks = False

    def __init__(self, model, args: ModelArgs, batch, layout: Layout, static: StaticPass):
        self.model, self.batch, self.static = model, batch, static
        key_bias(layout, batch.hole_lengths, static.bias)
        rope = query_rope(layout, args, batch.ids.device)
        static.rope.cos.copy_(rope.cos)
        static.rope.sin.copy_(rope.sin)
        static.qids.copy_(query_ids(layout, batch, args.pad_token_id))
        hidden = encode_shared(model, args, batch, static.arena)
        self.hole = static.qids[:, layout.shift:layout.shift + layout.slots]  # (batch, slots)
        self.first = _first_from_encode(model, hidden, layout, static.banned_ids, layout.slots)

    def logits(self, masked: Tensor, stale: Tensor, rows: Tensor | None) -> Tensor:
        return self.static.logits()

    def refresh(self, ids: Tensor) -> None:
        encode_rows(self.model, self.batch, ids, self.static.arena)


class ShrinkingSource:
    """Eager path for the CPU: each pass queries only the entries that matter (open slots,
    their predictors, slots that just changed) and finished rows leave the batch. A CPU pass
    costs what its rows cost, so shrinking them is where the time goes; a GPU pass costs the
    same for 1 or 64 rows, which is why CUDA takes StaticSource instead."""

    shrinks = True

    def __init__(self, model, args: ModelArgs, batch, layout: Layout, banned_ids: Tensor,
                 dtype: torch.dtype):
        device = batch.ids.device
        self.model, self.args, self.batch, self.layout = model, args, batch, layout
        self.banned_ids, self.dtype = banned_ids, dtype
        self.arena = allocate(args, layout, dtype, device)
        key_bias(layout, batch.hole_lengths, self.arena.bias)
        self.rope = query_rope(layout, args, device)
        self.qids = query_ids(layout, batch, args.pad_token_id)
        hidden = encode_shared(model, args, batch, self.arena)
        self.hole = self.qids[:, layout.shift:layout.shift + layout.lmax]  # (B, lmax)
        self.first = _first_from_encode(model, hidden, layout, banned_ids, layout.lmax)
        self._all_rows = torch.arange(layout.rows, device=device)[:, None]

    def logits(self, masked: Tensor, stale: Tensor, rows: Tensor | None) -> Tensor:
        """(b, lmax, V) for the open `rows` (None: all)."""
        layout = self.layout
        pick = slice(None) if rows is None else rows
        plan = plan_queries(masked[pick], stale[pick], self.batch.hole_valid[pick], layout.shift)
        at = (self._all_rows if rows is None else rows[:, None], plan.offsets)
        columns = torch.where(plan.valid, layout.context + plan.offsets, layout.scratch)
        hidden = self.model.step(self.qids[at], Rope(self.rope.cos[at], self.rope.sin[at]),
                                 self.arena.slots(columns))
        stale[pick] = False
        index = plan.predictor[..., None].expand(-1, -1, hidden.shape[-1])
        return masked_head(self.model, hidden.gather(1, index), self.banned_ids)

    def select(self, local: Tensor) -> None:
        self.arena = self.arena.select(local)

    def refresh(self, ids: Tensor) -> None:
        """Every row again, each from its own encode."""
        self.arena = allocate(self.args, self.layout, self.dtype, ids.device)
        key_bias(self.layout, self.batch.hole_lengths, self.arena.bias)
        encode_rows(self.model, self.batch, ids, self.arena)


class UncachedSource:
    """The reference path: a full forward over whole rows for every pass."""

    shrinks = False

    def __init__(self, model, batch, layout: Layout, banned_ids: Tensor):
        self.model, self.batch, self.layout, self.banned_ids = model, batch, layout, banned_ids
        self.ids = batch.ids.clone()
        self.hole = self.ids[:, layout.hole_start:layout.hole_start + layout.lmax]
        self.first = None

    def logits(self, masked: Tensor, stale: Tensor, rows: Tensor | None) -> Tensor:
        hidden = self.model(self.ids, self.batch.positions, self.batch.key_valid)
        lead = self.layout.lead
        return masked_head(self.model, hidden[:, lead:lead + self.layout.lmax], self.banned_ids)

    def refresh(self, ids: Tensor) -> None:
        pass  # every pass is a fresh forward already
