"""Session affinity with a load guard: which replica serves an editing session's request.

Plain Python (no Ray), so the choice is tested directly. router.py feeds it Serve's replica
ids and queue lengths.

- A session's home is the replica that ranks first for it by rendezvous (highest-random-weight)
  hashing: a pure function of the session and the replica ids, the same in every router
  process, and stable when replicas come or go (only the sessions of the replica that left, or
  1/N of them for one that joined, move).
- It stays there unless that replica's queue is over `min + max(abs_slack, rel_slack * mean)`
  of the candidates' queues (SGLang's guard, scaled to short FIM requests): then the least
  loaded replica takes it, and the session is remembered there, because that replica now holds
  its warm context. Where a session was last served is remembered in a bounded LRU with a TTL.
- A request without a session goes to the shorter queue of two random replicas (power of two).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

DEFAULT_ABS_SLACK = 4  # queued requests over the least loaded replica that are always fine
DEFAULT_REL_SLACK = 1.5  # ... or this many times the mean queue, whichever is larger
DEFAULT_MEMORY = 100_000  # sessions remembered
DEFAULT_TTL_S = 600.0  # a session idle this long goes back to its rendezvous home


def rendezvous_order(session: str, replicas: Sequence[str]) -> list[str]:
    """Replica ids by descending hash weight for `session` (first: its home)."""
    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


@dataclass
class Choice:
    replica: str
    reason: str  # "home", "remembered", "spill" or "two-choice"


class SessionAffinity:
    """Chooses replicas for sessions. Not thread-safe: one router event loop calls it."""

    def __init__(self, *, abs_slack: float = DEFAULT_ABS_SLACK,
                 rel_slack: float = DEFAULT_REL_SLACK, memory: int = DEFAULT_MEMORY,
                 ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        if abs_slack < 0 or rel_slack < 0 or memory < 1 or ttl_s <= 0:
            raise ValueError("abs_slack and rel_slack must be >= 0, memory >= 1, ttl_s > 0")
        self.abs_slack, self.rel_slack = abs_slack, rel_slack
        self.memory, self.ttl_s = memory, ttl_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._placed: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.spills = 0  # sessions moved off an overloaded replica

    def choose(self, session: str | None, replicas: Sequence[str],
               queue_len: Callable[[str], int | None]) -> Choice:
        """The replica for one request. `queue_len` may return None (not known yet: counted
        as idle; Serve probes before sending)."""
        if not replicas:
            raise ValueError("no replicas to choose from")
        if not session:
            pair = self._rng.sample(list(replicas), min(2, len(replicas)))
            return Choice(min(pair, key=lambda r: queue_len(r) or 0), "two-choice")
        loads = {r: queue_len(r) or 0 for r in replicas}
        order = rendezvous_order(session, replicas)
        remembered = self.remembered(session)
        home, reason = (remembered, "remembered") if remembered in loads else (order[0], "home")
        mean = sum(loads.values()) / len(loads)
        bound = min(loads.values()) + max(self.abs_slack, self.rel_slack * mean)
        if loads[home] > bound:
            rank = {r: i for i, r in enumerate(order)}
            home, reason = min(replicas, key=lambda r: (loads[r], rank[r])), "spill"
            self.spills += 1
        self.place(session, home)
        return Choice(home, reason)

    def place(self, session: str, replica: str) -> None:
        """Where the session was served (the router calls this with Serve's final pick)."""
        self._placed[session] = (replica, self._clock())
        self._placed.move_to_end(session)
        while len(self._placed) > self.memory:
            self._placed.popitem(last=False)

    def remembered(self, session: str) -> str | None:
        found = self._placed.get(session)
        if found is None:
            return None
        replica, at = found
        if self._clock() - at > self.ttl_s:
            del self._placed[session]
            return None
        return replica

    def forget_replica(self, replica: Hashable) -> None:
        """A replica died: its sessions go back to their rendezvous order."""
        for session in [s for s, (r, _) in self._placed.items() if r == replica]:
            del self._placed[session]

    def __len__(self) -> int:
        return len(self._placed)
