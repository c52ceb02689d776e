"""Static passes per shape bucket, captured as CUDA graphs and replayed (design/engine.md §2.4).

A pass launches ~15 kernels per layer; eagerly, a 7B pass was launch-bound at ~1,400 launches
(design/engine.md §6). Replaying a captured graph costs one launch. Shapes come in buckets
(engine/kv_arena.py: batch rows, context capacity, query entries), so a handful of graphs
serves every request; an LRU bounds them.

All passes share one K/V arena sized for the largest shape seen (each graph reads a view of it)
and one memory pool for their intermediates, so graphs cost little memory beyond the arena.
Captured shapes are recorded largest first, at load (`warm_up`) for the common ones; a new shape
met later is captured on the spot. When capture fails the shape runs eagerly and the failure
is logged once: slower, never wrong.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import torch

from engine.config import ModelArgs
from engine.kv_arena import BATCH_BUCKETS, KVArena, Layout, allocate
from engine.passes import StaticPass

log = logging.getLogger(__name__)

MAX_GRAPHS = 24


def shape_key(layout: Layout) -> tuple[int, int, int]:
    return layout.batch, layout.context, layout.query


class PassCache:
    """Hands out the StaticPass for a request's layout: a fresh eager one, or a cached graph."""

    def __init__(self, model, args: ModelArgs, dtype: torch.dtype, device: torch.device,
                 banned_ids: torch.Tensor, use_graphs: bool, max_graphs: int = MAX_GRAPHS):
        self.model, self.args, self.dtype, self.device = model, args, dtype, device
        self.banned_ids = banned_ids
        self.use_graphs = use_graphs and device.type == "cuda"
        self.max_graphs = max_graphs
        self._passes: OrderedDict[tuple[int, int, int], StaticPass] = OrderedDict()
        self._arena: KVArena | None = None
        self._pool = None
        self.captures = 0  # graphs recorded so far (a growing arena records them again)
        self.failures: list[str] = []  # shapes that fell back to eager, with the reason

    def get(self, layout: Layout) -> StaticPass:
        """The pass for this layout (its arena's layout is the request's own). Shapes past the
        largest batch bucket (many candidates) run eagerly rather than grow the arena."""
        if not self.use_graphs or layout.batch > BATCH_BUCKETS[-1]:
            arena = allocate(self.args, layout, self.dtype, self.device)
            return StaticPass(self.model, self.args, arena, self.banned_ids)
        key = shape_key(layout)
        found = self._passes.get(key)
        if found is None:
            found = self._capture(layout)
        else:
            self._passes.move_to_end(key)
        found.arena = dataclasses.replace(found.arena, layout=layout)
        return found

    def warm_up(self, layouts: list[Layout]) -> None:
        """Capture these shapes now, largest first (a pool sized by the first fits the rest)."""
        if not self.use_graphs:
            return
        for layout in sorted(layouts, key=lambda x: (x.batch * x.length, x.query), reverse=True):
            if shape_key(layout) not in self._passes:
                self._capture(layout)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return list(self._passes)

    def _capture(self, layout: Layout) -> StaticPass:
        self._ensure_arena(layout)
        arena = KVArena([k[:layout.batch, :, :layout.length] for k in self._arena.k],
                        [v[:layout.batch, :, :layout.length] for v in self._arena.v],
                        torch.zeros(layout.batch, 1, 1, layout.length, dtype=self.dtype,
                                    device=self.device), layout)
        static = StaticPass(self.model, self.args, arena, self.banned_ids)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.current_stream()
        try:
            with torch.inference_mode():
                static.capture(self._pool)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            # A failed capture can leave its capture stream current and its pool half-used:
            # restore the stream and stop capturing for this engine; eager passes stay exact.
            torch.cuda.set_stream(stream)
            self.use_graphs, self._pool = False, None
            reason = " ".join(str(error).split())[:300]
            self.failures.append(f"{shape_key(layout)}: {reason}")
            log.error("CUDA graph capture failed for shape %s; passes run eagerly from now on: "
                      "%s", shape_key(layout), reason)
            return StaticPass(self.model, self.args, arena, self.banned_ids)
        self.captures += 1
        self._passes[shape_key(layout)] = static
        while len(self._passes) > self.max_graphs:
            self._passes.popitem(last=False)
        return static

    def _ensure_arena(self, layout: Layout) -> None:
        """One arena for every graph; growing it re-records the graphs (their pointers die)."""
        have = self._arena
        if have is not None and have.layout.batch >= layout.batch and \
                have.layout.length >= layout.length:
            return
        batch = max(layout.batch, have.layout.batch if have else 0)
        length = max(layout.length, have.layout.length if have else 0)
        self._passes.clear()
        self._arena = None
        # A pool whose graphs are all gone must not be entered again (its use count is zero
        # while the capture stream's cuBLAS workspace still lives in it): take a fresh one.
        self._pool = None
        grown = dataclasses.replace(layout, batch=batch, length=length)
        self._arena = allocate(self.args, grown, self.dtype, self.device)
