"""A worn reuse chain encoded afresh in the background, so the next keystroke stays warm.

Each request that reuses a cached context leaves an entry one hop further from a full encode
(engine/denoise/context_cache.py); at `max_reuses` hops the entry is worn and no request reuses it.
Without this, the next keystroke pays the cold encode on its own path (about 3x a warm
request on the CPU). Instead, when a request leaves a worn entry, the engine's worker, once
idle, encodes that same context from scratch, through the very prefill a cold request runs
(engine/denoise/prefill.py), and puts the 0-hop entry in the worn one's place. The next request then
reuses it warm, one hop from exact.

When: at the hop limit itself, where the chain's next request would otherwise encode cold on
its own path. A refresh that has started stops between two layers of its encode as soon as a
request arrives (the worker's ENCODE_GATE, engine/denoise/batch_worker.py), so it delays a request
by one layer at most; the interrupted refresh is dropped, and if that request is the chain's next
one it encodes cold and leaves a fresh entry itself.

It runs before the speculative next context (engine/denoise/speculation.py): a speculation grows
from the entry its text continues, and cannot grow from a worn one (it would be worn at birth), so
refreshing first is what lets the accepted completion start warm as well.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.denoise.context_cache import CachedContext, ContextCache
from engine.denoise.fim import build_infill_batch, lead_specials, trail_specials
from engine.denoise.prefill import context_ids, entry_alone
from engine.model.config import ModelArgs


def refresh_context(model, args: ModelArgs, cache: ContextCache, worn: CachedContext,
                    banned_ids: Tensor, dtype: torch.dtype,
                    device: torch.device) -> CachedContext | None:
    """Encode `worn`'s context from scratch and put the fresh entry in its place; returns it,
    or None when `worn` has left the cache meanwhile (evicted, or superseded by a newer
    request's entry): its context is no longer anyone's."""
    if not cache.holds(worn):
        return None
    n_trail = len(trail_specials(args))
    prefix_ids = worn.lead[len(lead_specials(args)):].tolist()
    suffix_ids = worn.tail[:worn.tail.numel() - n_trail].tolist()
    batch = build_infill_batch(args, prefix_ids, suffix_ids, [worn.hole], device)
    lead, tail = context_ids(batch)
    if not (torch.equal(lead, worn.lead) and torch.equal(tail, worn.tail)):
        return None  # not a context this model's layout builds: leave it to age out
    fresh = entry_alone(model, args, batch, banned_ids, None, dtype, device)
    return fresh if cache.replace(worn, fresh) else None
