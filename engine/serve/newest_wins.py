"""The one newest-wins rule: per key, only the newest entry is live. When an entry begins for
a key, every older entry still registered for it is superseded: the caller's `supersede`
decides what that means for it (a waiting job is dropped, a running one flagged to stop
between denoising steps, an LSP request answered empty). Used by the LSP server per document
(lsp_server/debounce.py, on the event loop), and by the engine host per (client, document)
(engine/serve/host.py, under its lock). Not locked itself: its user serializes the calls.
Torch-free."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

E = TypeVar("E")


class NewestWins(Generic[E]):
    """Entries registered per key, oldest first; `begin` supersedes the older ones."""

    def __init__(self, supersede: Callable[[E], None]):
        self._supersede = supersede
        self._entries: dict[Hashable, list[E]] = {}
        self.superseded = 0  # entries superseded so far

    def begin(self, key: Hashable, entry: E) -> None:
        """Register `entry` as the newest for `key`; supersede (and forget) the older ones."""
        older = self._entries.get(key, [])
        self._entries[key] = [entry]
        for previous in older:
            self.superseded += 1
            self._supersede(previous)

    def end(self, key: Hashable, entry: E) -> None:
        """`entry` is done (answered, dropped or stopped): forget it."""
        entries = self._entries.get(key)
        if entries is None:
            return
        for i, registered in enumerate(entries):
            if registered is entry:
                del entries[i]
                break
        if not entries:
            del self._entries[key]

    def is_latest(self, key: Hashable, entry: E) -> bool:
        entries = self._entries.get(key)
        return bool(entries) and entries[-1] is entry

    def live(self, key: Hashable) -> list[E]:
        return list(self._entries.get(key, ()))
