"""Static passes per shape bucket, captured as CUDA graphs and replayed (design/engine.md §2.4).

A pass launches ~15 kernels per layer; eagerly, a 7B pass was launch-bound at ~1,400 launches
(design/engine.md §6). Replaying a captured graph costs one launch. Shapes come in buckets
(engine/denoise/kv_arena.py: batch rows, context capacity, query entries), so a handful of graphs
serves every request; an LRU bounds them.

All passes share one K/V arena sized for the largest shape seen (each graph reads a view of it,
eager passes too) and one memory pool for their intermediates, so graphs cost little memory
beyond the arena. Requests in flight together keep their rows in it
(engine/denoise/static_batch.py):
a row's column holds the same memory in every shape's view, so a shape change moves nothing.
Captured shapes are recorded largest first, at load (`warm_up`) for the common ones; a new shape
met later is captured on the spot. When capture fails the shape runs eagerly and the failure
is logged once: slower, never wrong.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import torch

from engine.denoise.buckets import BATCH_BUCKETS
from engine.denoise.kv_arena import KVArena, Layout, allocate
from engine.denoise.passes import StaticPass
from engine.model.config import ModelArgs

log = logging.getLogger(__name__)

MAX_GRAPHS = 48


def shape_key(layout: Layout, refresh: int = 0) -> tuple[int, int, int, int]:
    return layout.batch, layout.context, layout.query, refresh


class PassCache:
    """Hands out the StaticPass for a request's layout: a fresh eager one, or a cached graph."""

    def __init__(self, model, args: ModelArgs, dtype: torch.dtype, device: torch.device,
                 banned_ids: torch.Tensor, use_graphs: bool, max_graphs: int = MAX_GRAPHS):
        self.model, self.args, self.dtype, self.device = model, args, dtype, device
        self.banned_ids = banned_ids
        self.use_graphs = use_graphs and device.type == "cuda"
        self.max_graphs = max_graphs
        self._passes: OrderedDict[tuple[int, int, int, int], StaticPass] = OrderedDict()
        self._arena: KVArena | None = None
        self._pool = None
        self.captures = 0  # graphs recorded so far (a growing arena records them again)
        self.failures: list[str] = []  # shapes that fell back to eager, with the reason

    def get(self, layout: Layout, refresh: int = 0, arena: KVArena | None = None) -> StaticPass:
        """The pass for this shape (with `refresh` join entries), over the one shared arena, so
        requests of a batch keep their rows' K/V when the shape changes. Shapes past the
        largest batch bucket (many candidates) run eagerly over `arena` or a private one rather
        than grow the shared one."""
        if layout.batch > BATCH_BUCKETS[-1]:
            if arena is None or arena.layout.batch < layout.batch:
                arena = allocate(self.args, layout, self.dtype, self.device)
            view = KVArena(arena.k, arena.v, torch.zeros_like(arena.bias), layout)
            return StaticPass(self.model, self.args, view, self.banned_ids, refresh)
        if not self.use_graphs:
            self._ensure_arena(layout)
            return StaticPass(self.model, self.args, self._view(layout), self.banned_ids,
                              refresh)
        key = shape_key(layout, refresh)
        found = self._passes.get(key)
        if found is None:
            found = self._capture(layout, refresh)
        else:
            self._passes.move_to_end(key)
        found.arena = dataclasses.replace(found.arena, layout=layout)
        return found

    @property
    def arena(self) -> KVArena | None:
        """The shared arena at its full size (rows and columns of every shape's view)."""
        return self._arena

    def warm_up(self, layouts: list[Layout], refresh: tuple[int, ...] = (0,)) -> None:
        """Capture these shapes now (each with these join widths), largest first (a pool sized
        by the first fits the rest)."""
        if not self.use_graphs:
            return
        for layout in sorted(layouts, key=lambda x: (x.batch * x.length, x.query), reverse=True):
            for width in sorted(refresh, reverse=True):
                if shape_key(layout, width) not in self._passes:
                    self._capture(layout, width)

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        return list(self._passes)

    def _capture(self, layout: Layout, refresh: int = 0) -> StaticPass:
        self._ensure_arena(layout)
        arena = self._view(layout)
        static = StaticPass(self.model, self.args, arena, self.banned_ids, refresh)
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
            self.failures.append(f"{shape_key(layout, refresh)}: {reason}")
            log.error("CUDA graph capture failed for shape %s; passes run eagerly from now on: "
                      "%s", shape_key(layout, refresh), reason)
            return StaticPass(self.model, self.args, arena, self.banned_ids, refresh)
        self.captures += 1
        self._passes[shape_key(layout, refresh)] = static
        while len(self._passes) > self.max_graphs:
            self._passes.popitem(last=False)
        return static

    def _view(self, layout: Layout) -> KVArena:
        """Rows and columns of the shared arena for one shape, with a bias of its own."""
        return KVArena([k[:layout.batch, :, :layout.length] for k in self._arena.k],
                       [v[:layout.batch, :, :layout.length] for v in self._arena.v],
                       torch.zeros(layout.batch, 1, 1, layout.length, dtype=self.dtype,
                                   device=self.device), layout)

    def _ensure_arena(self, layout: Layout) -> None:
        """One arena for every graph; growing it re-records the graphs (their pointers die)
        and carries over what the old one held (rows of requests in flight)."""
        have = self._arena
        if have is not None and have.layout.batch >= layout.batch and \
                have.layout.length >= layout.length:
            return
        batch = max(layout.batch, have.layout.batch if have else 0)
        length = max(layout.length, have.layout.length if have else 0)
        self._passes.clear()
        # A pool whose graphs are all gone must not be entered again (its use count is zero
        # while the capture stream's cuBLAS workspace still lives in it): take a fresh one.
        self._pool = None
        grown = allocate(self.args, dataclasses.replace(layout, batch=batch, length=length),
                         self.dtype, self.device)
        if have is not None:
            rows, columns = have.layout.batch, have.layout.length
            for new, old in zip((*grown.k, *grown.v), (*have.k, *have.v), strict=True):
                new[:rows, :, :columns] = old
        self._arena = grown
