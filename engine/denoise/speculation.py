"""The next completion's context, prepared before it is asked for.

After a completion is returned, the likeliest next request is the same place with the completion
accepted: prefix + completion, same suffix. When the engine's worker has nothing else to do
(a worn context it would grow from is re-encoded first, engine/denoise/context_refresh.py) it builds
that context from the one just used (a warm prefill over the accepted tokens: one step-sized
pass, engine/denoise/prefill.py) and keeps it in the context cache marked speculative. A
request that matches it starts warm; once the user types something else instead (a request
that continues from the context the speculation grew from), the cache drops it
(ContextCache.plan). It never encodes from scratch: when the accepted text cannot reuse the
context it follows, it is skipped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.denoise.context_cache import CachedContext, ContextCache
from engine.denoise.fim import build_infill_batch, lead_specials
from engine.denoise.kv_arena import Layout
from engine.denoise.prefill import context_ids, entry_alone
from engine.model.config import ModelArgs


def speculate_accepted(model, args: ModelArgs, cache: ContextCache, prefix_ids: list[int],
                       suffix_ids: list[int], hole: int, banned_ids: Tensor, dtype: torch.dtype,
                       device: torch.device) -> CachedContext | None:
    """Add the speculative context (prefix_ids, suffix_ids) with a `hole`-slot hole to the
    cache; returns the entry, or None when it is already there or would need a full encode."""
    batch = build_infill_batch(args, prefix_ids, suffix_ids, [hole], device)
    layout = Layout.of(batch, args, static=False)
    lead, tail = context_ids(batch)
    plan = cache.plan(lead, tail, len(lead_specials(args)), layout.lead, hole, count=False)
    if plan is None or plan.changed.numel() == 0:
        return None
    entry = entry_alone(model, args, batch, banned_ids, plan, dtype, device)
    entry.speculative, entry.parent = True, plan.entry
    cache.put(entry)
    return entry
