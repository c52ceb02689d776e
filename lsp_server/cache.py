"""Answers that need no model run besides the exact cache (engine/serve/exact_cache.py, the
one LRU the server and the shared engine both keep): typed-through reuse."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class _Shown:
    anchor: int  # cursor offset the suggestion was made for
    before: str  # the text just before that cursor
    after: str  # the text just after that cursor
    texts: tuple[str, ...]


class TypedThrough:
    """Reuse the last suggestion per document while the user types its first characters.

    When the text before the cursor grew by exactly what the user typed, nothing after the
    cursor changed, and a remembered suggestion starts with the typed characters, the rest of
    that suggestion is the answer, with no model run (Tabby and llama.vim do the same).
    """

    CONTEXT_CHARS = 256  # how much text around the anchor must be unchanged
    MAX_TYPED = 200

    def __init__(self) -> None:
        self._shown: dict[str, _Shown] = {}
        self.hits = 0

    def remember(self, uri: str, text: str, offset: int, texts: tuple[str, ...]) -> None:
        if not texts:
            self._shown.pop(uri, None)
            return
        self._shown[uri] = _Shown(
            anchor=offset,
            before=text[max(0, offset - self.CONTEXT_CHARS) : offset],
            after=text[offset : offset + self.CONTEXT_CHARS],
            texts=texts,
        )

    def reuse(self, uri: str, text: str, offset: int) -> tuple[str, ...] | None:
        shown = self._shown.get(uri)
        if shown is None:
            return None
        typed_length = offset - shown.anchor
        if not 0 < typed_length <= self.MAX_TYPED:
            return None
        if text[shown.anchor - len(shown.before) : shown.anchor] != shown.before:
            return None
        if text[offset : offset + self.CONTEXT_CHARS] != shown.after:
            return None
        typed = text[shown.anchor : offset]
        rests = tuple(
            t[typed_length:] for t in shown.texts if t.startswith(typed) and len(t) > typed_length
        )
        if rests:
            self.hits += 1
        return rests or None

    def forget(self, uri: str) -> None:
        self._shown.pop(uri, None)


def inserted_at(before: str, after: str, offset: int, context: int = 256) -> str | None:
    """The text typed at `offset` if that insertion is the only change from `before` to
    `after` (checked over `context` characters each side), else None."""
    length = len(after) - len(before)
    if length <= 0:
        return None
    unchanged = (
        after[max(0, offset - context) : offset] == before[max(0, offset - context) : offset]
        and after[offset + length : offset + length + context] == before[offset : offset + context]
    )
    return after[offset : offset + length] if unchanged else None
