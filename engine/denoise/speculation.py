"""The next completion's context, prepared before it is asked for.

After a completion is returned, the likeliest next request is the same place with the completion
accepted: prefix + completion, same suffix. When the engine's worker has nothing else to do
(a worn context it would grow from is re-encoded first, engine/denoise/context_refresh.py) it builds
that context and keeps it in the context cache marked speculative. A request that matches it
starts warm; once the user types something else instead (a request that continues from the
context the speculation grew from), the cache drops it (ContextCache.plan).

Cached states serve only a hole of the length they were computed beside, so the speculation is
made beside the hole the next request will use: its stop mode after the accepted text
(engine/stop.py stop_after_accepting) sets its longest hole (a `block` request is often followed
by a `line` one, 32 -> 24 slots). Beside the same hole it grows from the context just used (a
warm prefill over the accepted tokens: one step-sized pass, engine/denoise/prefill.py); when the
accepted text cannot reuse that context (a long edit) it is skipped. Beside another hole length
no entry can be grown from (reusing states computed beside the other hole changes answers: the
cache refuses it), so it is encoded in full, as a cold request would: the answer after accepting
is then exactly the cold one's. The engine guesses that stop as the server's automatic rule
would pick it; when that changes the hole, it speculates beside this request's hole too (grown,
one step-sized pass), for a client whose stop is a fixed setting. A speculation encoded in full
stops between two layers when a request arrives (model.ENCODE_GATE), as a refresh does.
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
                       device: torch.device, *, follows: CachedContext | None = None
                       ) -> CachedContext | None:
    """Add the speculative context (prefix_ids, suffix_ids) with a `hole`-slot hole to the
    cache; returns the entry, or None when it is already there or has nothing to grow from.
    `follows`: the context just used, when it was computed beside another hole length; with
    no entry of this hole length to grow from, the context is then encoded in full (and
    dropped, like a grown one, once a request continues from `follows` instead)."""
    batch = build_infill_batch(args, prefix_ids, suffix_ids, [hole], device)
    layout = Layout.of(batch, args, static=False)
    lead, tail = context_ids(batch)
    plan = cache.plan(lead, tail, len(lead_specials(args)), layout.lead, hole, count=False)
    if plan is not None:
        if plan.changed.numel() == 0:
            return None
        parent = plan.entry
    elif follows is not None:
        parent = follows
    else:
        return None
    entry = entry_alone(model, args, batch, banned_ids, plan, dtype, device)
    entry.speculative, entry.parent = True, parent
    cache.put(entry)
    return entry
