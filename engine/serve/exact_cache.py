"""The one exact-result cache: an LRU of finished answers keyed by everything that decides
them. Two places keep an instance: the LSP server (post-processed suggestions keyed by the
context and the knobs: lsp_server/completion.py) and the shared engine (results of deterministic
requests keyed by the request itself, `request_key`: engine/serve/host.py), so several
windows, or a script, asking the same thing get one model run. Thread-safe; torch-free."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import replace
from typing import Generic, TypeVar

import msgspec

from engine.api import CompletionRequest

V = TypeVar("V")


class ExactCache(Generic[V]):
    """LRU of `capacity` answers (0: caches nothing); `hits`/`misses` count the lookups."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: Hashable, value: V) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def request_key(request: CompletionRequest) -> bytes | None:
    """The key of a deterministic request (a seed, or greedy with one candidate), its deadline
    left out; None for one whose answer may differ run to run (never cached)."""
    deterministic = request.seed is not None or (
        request.temperature == 0 and request.num_candidates == 1
    )
    if not deterministic:
        return None
    try:
        return msgspec.msgpack.encode(replace(request, timeout_ms=None))
    except (OverflowError, TypeError, msgspec.EncodeError):  # refused by validate anyway
        return None
