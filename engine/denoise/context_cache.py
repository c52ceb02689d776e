"""Encoded contexts kept across requests, so a keystroke re-encodes only what it changed.

An entry holds a request's context token ids (`lead`: specials + prefix, up to the hole;
`tail`: suffix + trailing specials) and every layer's K/V of those tokens, keys already rotated
to their true positions (tail token j sits at len(lead) + hole + j). Entries live on the
model's device under a byte budget, least recently used first out.

A new request looks for the entry it can reuse most of (`ContextCache.plan`): the longest run
of its prefix tokens matching an entry's, and the longest run of its suffix tokens matching
after the hole. Each side is matched from its start, or at an offset found by an anchor of
ANCHOR tokens: a context window that slid by a line (prefix) or a hole that moved down a few
lines (suffix) keeps its reuse. Reused keys are re-rotated by their position change, which for
RoPE is exact; everything else (the changed tokens) is computed by the request's first pass.

What is not exact, and why it is bounded: a bidirectional model's reused states saw the old
text around them (the same staleness the in-request dual cache accepts for the hole). An entry
that was itself built by reuse counts one more hop; an entry `max_reuses` hops from a full
encode is worn: no request reuses it. When a request leaves a worn entry, the engine's worker
re-encodes that context from scratch when idle (engine/denoise/context_refresh.py) and `replace`s it
with the fresh 0-hop entry, so the next keystroke stays warm and one hop from exact; a request
that arrives first drops the refresh and, finding only the worn entry, encodes from scratch
itself, which resets the count too. More than `max_changed` changed tokens, or an edit of
more than a quarter of the context, also encode from scratch. docs/LOG.md has the measured
agreement with cold requests.

Keys are token ids, never document names: the engine knows nothing of files or editors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

ANCHOR = 8  # tokens that locate one side's run at an offset: short runs repeat (indentation)
DEFAULT_MAX_REUSES = 8
DEFAULT_MAX_CHANGED = 48
DEFAULT_WINDOW = 8
# Reuse only a context that mostly stayed: past a quarter of it edited, the reused states saw a
# different program (a short file's few shared tokens, "def ", are no context at all).
MAX_EDITED_SHARE = 0.25
DEFAULT_BUDGET_BYTES = 256 << 20


@dataclass(eq=False)
class CachedContext:
    lead: Tensor  # (P,) int64 on the CPU: ids before the hole, the lead specials included
    tail: Tensor  # (S,) int64 on the CPU: ids after the hole
    hole: int  # hole length the states were computed beside (sets the tail's positions)
    k: list[Tensor]  # per layer (Hkv, P + S, D), keys at their true positions
    v: list[Tensor]
    reuses: int = 0  # hops since the last full encode
    speculative: bool = False  # prepared "as if accepted", not asked for yet
    parent: CachedContext | None = field(default=None, repr=False)  # what a speculation grew from

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def position(self, index: Tensor) -> Tensor:
        """True positions of context indices (lead then tail)."""
        n_lead = self.lead.numel()
        return torch.where(index < n_lead, index, index + self.hole)


@dataclass
class ReusePlan:
    """How a new context (lead', tail') maps onto a cached entry."""

    entry: CachedContext
    new_index: Tensor  # (n,) context indices of the new request that take cached K/V
    old_index: Tensor  # (n,) their indices in the entry
    changed: Tensor  # (m,) new context indices to compute (query-block tokens excluded)
    edited: int = 0  # of those, tokens that differ from the entry (the rest: the window)

    @property
    def reused(self) -> int:
        return int(self.new_index.numel())


def _common_run(a: Tensor, b: Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


def _find(hay: Tensor, needle: Tensor) -> int | None:
    k = needle.numel()
    if k == 0 or hay.numel() < k:
        return None
    hits = (hay.unfold(0, k, 1) == needle).all(dim=1).nonzero()
    return int(hits[0]) if hits.numel() else None


def _best_run(new: Tensor, old: Tensor) -> tuple[int, int, int]:
    """(start in new, start in old, length) of the longest run found from either start, or at
    an offset located by an anchor of ANCHOR tokens (of either side's start)."""
    best = (0, 0, _common_run(new, old))
    if best[2] == min(new.numel(), old.numel()):
        return best
    at_old = _find(old, new[:ANCHOR]) if new.numel() >= ANCHOR else None
    if at_old:
        best = max(best, (0, at_old, _common_run(new, old[at_old:])), key=lambda r: r[2])
    at_new = _find(new, old[:ANCHOR]) if old.numel() >= ANCHOR else None
    if at_new:
        best = max(best, (at_new, 0, _common_run(new[at_new:], old)), key=lambda r: r[2])
    return best


def _second_run(new: Tensor, old: Tensor, head: int, window: int
                ) -> tuple[int, int, int] | None:
    """After a common head of `head` tokens: the run of new[head:] and old[head:] found by an
    anchor of ANCHOR tokens at either side's start (as _best_run: the window's start moved
    forward or back), as (start in new, start in old, length), less its first `window` tokens
    (next to the change, they are recomputed); None when there is no head, nothing after it,
    or no anchor. Both ways matter: a keystroke whose tokens merge lets the window start one
    token earlier (measured in the keystroke replay with an extra-context block: that
    request found no run and encoded its whole prefix again)."""
    if head < ANCHOR or new.numel() - head < ANCHOR:
        return None
    s_new, s_old, length = _best_run(new[head:], old[head:])
    length -= window
    if length <= 0:
        return None
    return head + s_new + window, head + s_old + window, length


def match(entry: CachedContext, lead: Tensor, tail: Tensor, n_specials: int,
          query_from: int, window: int = 0) -> ReusePlan:
    """The plan for new context (lead, tail) against one entry. Lead indices >= query_from
    belong to the query block (computed every first pass) and are never reused.

    The lead specials ([BOS]) keep position 0 on both sides; the prefix proper and the tail are
    each matched as one run (see _best_run). The `window` reused tokens nearest the edit on
    each side (the end of the prefix run, the start of the tail run) are recomputed too: their
    states depend most on what changed next to them. An exact repeat recomputes nothing: its
    states are the ones a cold encode computes (the same request twice gives the same text)."""
    if torch.equal(lead, entry.lead) and torch.equal(tail, entry.tail):
        window = 0
    new_parts, old_parts = [], []
    specials = n_specials if torch.equal(lead[:n_specials], entry.lead[:n_specials]) else 0
    specials = min(specials, query_from)
    if specials:
        new_parts.append(torch.arange(specials))
        old_parts.append(torch.arange(specials))
    new_lead, old_lead = lead[n_specials:query_from], entry.lead[n_specials:]
    s_new, s_old, n = _best_run(new_lead, old_lead)
    # A stable head (an extra-context block, issue 23) then a prefix whose start moved: the
    # head is one run from the start, the prefix's rest a second run found by an anchor.
    second = _second_run(new_lead, old_lead, n, window) if s_new == s_old == 0 else None
    n_edited = query_from - n_specials - n - (second[2] if second else 0)
    if second is not None:
        new_parts.append(torch.arange(n) + n_specials)
        old_parts.append(torch.arange(n) + n_specials)
        s_new, s_old, n = second
    n = max(n - window, 0)
    if n:
        new_parts.append(torch.arange(n) + n_specials + s_new)
        old_parts.append(torch.arange(n) + n_specials + s_old)
    t_new, t_old, m = _best_run(tail, entry.tail)
    n_edited += tail.numel() - m
    skip = min(window, m)
    if m > skip:
        new_parts.append(torch.arange(skip, m) + lead.numel() + t_new)
        old_parts.append(torch.arange(skip, m) + entry.lead.numel() + t_old)
    new_index = torch.cat(new_parts) if new_parts else torch.zeros(0, dtype=torch.long)
    old_index = torch.cat(old_parts) if old_parts else torch.zeros(0, dtype=torch.long)
    needed = torch.ones(lead.numel() + tail.numel(), dtype=torch.bool)
    needed[query_from:lead.numel()] = False
    needed[new_index] = False
    return ReusePlan(entry, new_index, old_index, needed.nonzero().flatten(),
                     edited=n_edited + n_specials - specials)


class ContextCache:
    """LRU of CachedContext under a byte budget. Safe to call from any thread."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 max_reuses: int = DEFAULT_MAX_REUSES, max_changed: int = DEFAULT_MAX_CHANGED,
                 window: int = DEFAULT_WINDOW):
        self.budget_bytes = budget_bytes
        self.max_reuses = max_reuses
        self.max_changed = max_changed
        self.window = window
        self._entries: OrderedDict[int, CachedContext] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.speculative_hits = self.speculative_drops = 0
        self.refreshes = 0  # worn entries replaced by a fresh encode

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def entries(self) -> list[CachedContext]:
        with self._lock:
            return list(self._entries.values())

    def plan(self, lead: Tensor, tail: Tensor, n_specials: int, query_from: int, hole: int,
             count: bool = True) -> ReusePlan | None:
        """The usable plan that reuses the most, or None (encode from scratch). Only entries
        whose states saw a hole of the same length qualify: beside a longer or shorter run of
        masks the context states differ too much (a memorized middle flipped on the test
        model). A speculative entry the request does not grow from is dropped once the request
        continues the text it was speculated from instead (the user typed something else)."""
        limit = min(self.max_changed, MAX_EDITED_SHARE * (lead.numel() + tail.numel()))
        with self._lock:
            best: ReusePlan | None = None
            for entry in self._entries.values():
                if self.worn(entry) or entry.hole != hole:
                    continue
                found = match(entry, lead, tail, n_specials, query_from, self.window)
                if found.edited > limit or found.reused == 0:
                    continue
                if best is None or found.reused > best.reused:
                    best = found
            if count:
                self._count(best)
            if best is not None:
                self._entries.move_to_end(id(best.entry))
            return best

    def worn(self, entry: CachedContext) -> bool:
        """Too many hops from a full encode to be reused."""
        return entry.reuses >= self.max_reuses

    def find(self, lead: Tensor, tail: Tensor, hole: int) -> CachedContext | None:
        """The entry asked for (not speculative) that holds exactly this context, if any."""
        with self._lock:
            for entry in reversed(self._entries.values()):
                if not entry.speculative and entry.hole == hole and \
                        torch.equal(entry.lead, lead) and torch.equal(entry.tail, tail):
                    return entry
            return None

    def holds(self, entry: CachedContext) -> bool:
        with self._lock:
            return self._entries.get(id(entry)) is entry

    def replace(self, worn: CachedContext, fresh: CachedContext) -> bool:
        """Put `fresh` (the same context, encoded from scratch) in the place of `worn`; False
        (and nothing stored) when `worn` is gone already: evicted, or superseded by a newer
        request's entry. Speculations grown from `worn` now count as grown from `fresh`."""
        with self._lock:
            if self._entries.get(id(worn)) is not worn:
                return False
            self._entries = OrderedDict(
                (id(fresh), fresh) if entry is worn else (key, entry)
                for key, entry in self._entries.items())
            for entry in self._entries.values():
                if entry.parent is worn:
                    entry.parent = fresh
            self.refreshes += 1
            self._evict()
            return True

    def _count(self, best: ReusePlan | None) -> None:
        if best is None:
            self.misses += 1
            return
        self.hits += 1
        if best.entry.speculative:
            self.speculative_hits += 1
        for entry in list(self._entries.values()):
            if entry.speculative and entry is not best.entry and entry.parent is best.entry:
                self._remove(entry)
                self.speculative_drops += 1

    def put(self, entry: CachedContext, replaces: CachedContext | None = None) -> None:
        """Store an entry (evicting least recently used ones past the budget). `replaces`: the
        entry it was built from, which the new one supersedes (one entry per editing chain)."""
        size = entry.nbytes
        with self._lock:
            if replaces is not None and not entry.speculative:
                self._remove(replaces)
            if size > self.budget_bytes:
                return
            self._entries[id(entry)] = entry
            self._evict()

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        while total > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            total -= old.nbytes
            self.evictions += 1

    def promote(self, entry: CachedContext) -> None:
        """A speculative entry a request has used is an ordinary one from now on."""
        entry.speculative = False
        entry.parent = None

    def drop_speculative(self) -> None:
        with self._lock:
            for entry in [e for e in self._entries.values() if e.speculative]:
                self._remove(entry)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _remove(self, entry: CachedContext) -> None:
        self._entries.pop(id(entry), None)
