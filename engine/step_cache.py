"""K/V cache for the denoising steps: the dual cache, plus delayed caching of committed slots.

The cache holds every column's K/V for each row (context and hole alike). A step queries only
the columns whose state matters now, and writes their fresh K/V back:
- every masked slot (its K/V follow the context as it fills in),
- the column whose hidden state predicts each masked slot (the left neighbour when logits are
  shifted, the slot itself otherwise),
- every slot whose token changed since its K/V were computed (committed last step, or padded).
A committed slot is thus queried once more with its token in place and then frozen: dKV-Cache's
delayed caching, on top of the dual cache of design/engine.md §2.1. As slots commit, the query
rows shrink from the whole hole to the few still open, which is where a step's time goes on a CPU.

One extra scratch column at the end of every row takes the writes of padded query entries; it is
never a valid key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.model import ContextKV


@dataclass
class StepCache:
    k: list[Tensor]  # per layer (b, Hkv, T + 1, D)
    v: list[Tensor]
    valid: Tensor  # (b, T + 1) bool: columns holding a real token of the row (scratch: False)

    @classmethod
    def from_context(cls, ctx: ContextKV, valid: Tensor) -> StepCache:
        """ctx: per-layer (b, Hkv, T, D) K/V (views are copied); valid (b, T)."""
        def grow(t: Tensor) -> Tensor:
            return F.pad(t, (0, 0, 0, 1))  # a zero scratch column; always a fresh tensor

        return cls([grow(k) for k in ctx.k], [grow(v) for v in ctx.v], F.pad(valid, (0, 1)))

    @property
    def scratch(self) -> int:
        return self.valid.shape[1] - 1

    def select(self, local: Tensor) -> StepCache:
        """The cache of a subset of its rows (`local`: row indices within this cache)."""
        return StepCache([k[local] for k in self.k], [v[local] for v in self.v], self.valid[local])

    def context(self) -> ContextKV:
        return ContextKV(k=self.k, v=self.v)

    def write(self, columns: Tensor, kv: ContextKV) -> None:
        """Store the query columns' fresh K/V: columns (b, n) cache column per query entry."""
        for cached, fresh in ((self.k, kv.k), (self.v, kv.v)):
            for layer, new in zip(cached, fresh, strict=True):  # new (b, Hkv, n, D)
                index = columns[:, None, :, None].expand_as(new)
                layer.scatter_(2, index, new.to(layer.dtype))


@dataclass
class QueryPlan:
    offsets: Tensor  # (b, n) query entries as offsets from the first hole-query column q0
    valid: Tensor  # (b, n) bool
    predictor: Tensor  # (b, Lmax) entry whose hidden state predicts slot j (meaningful if masked)


def plan_queries(masked: Tensor, stale: Tensor, hole_valid: Tensor, shift: int,
                 width: int | None = None) -> QueryPlan:
    """Which columns a step queries. Offsets count from q0 = hole_start - shift: slot j's own
    column is offset j + shift, and its predictor is offset j (the lead token for slot 0 when
    logits are shifted). masked/stale/hole_valid are (b, Lmax) bool. `width`: a fixed number of
    query entries (no host sync); None: just enough for the row that wants the most."""
    b, lmax = masked.shape
    want = torch.zeros(b, lmax + shift, dtype=torch.bool, device=masked.device)
    want[:, shift:] |= (masked | stale) & hole_valid
    want[:, :lmax] |= masked
    counts = want.sum(dim=1)  # (b,)
    if width is None:
        width = max(1, int(counts.max()))  # a host sync: the query rows shrink as slots commit
    order = torch.argsort((~want).to(torch.int8), dim=1, stable=True)  # wanted offsets first
    offsets = order[:, :width]
    valid = torch.arange(width, device=masked.device)[None, :] < counts[:, None]
    entry = torch.zeros(b, lmax + shift, dtype=torch.long, device=masked.device)
    entry.scatter_(1, offsets, torch.arange(width, device=masked.device).expand(b, width))
    return QueryPlan(offsets=offsets, valid=valid, predictor=entry[:, :lmax])
