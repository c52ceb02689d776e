"""Where the user edited lately (Continue's "recently edited ranges"): the last few places,
each as a few lines around the edit, from the last two minutes."""

from __future__ import annotations

from dataclasses import dataclass

MAX_RANGES = 3
AROUND_LINES = 5
MAX_AGE_S = 120.0
MERGE_LINES = 10  # an edit this close to a remembered one moves it instead of adding one


@dataclass
class _Edit:
    key: str
    line: int
    at: float


class RecentEdits:
    def __init__(self) -> None:
        self._edits: list[_Edit] = []  # newest last

    def record(self, key: str, line: int, now: float) -> None:
        for edit in self._edits:
            if edit.key == key and abs(edit.line - line) <= MERGE_LINES:
                self._edits.remove(edit)
                break
        self._edits.append(_Edit(key, line, now))
        del self._edits[: -MAX_RANGES * 4]

    def forget(self, key: str) -> None:
        self._edits = [edit for edit in self._edits if edit.key != key]

    def ranges(
        self, now: float, skip: tuple[str, int, int] | None = None
    ) -> list[tuple[str, int, int]]:
        """(key, first, last line) around the newest edits, newest first; edits inside `skip`
        (the request's own context: key, first, last line) are left out."""
        out = []
        for edit in reversed(self._edits):
            if now - edit.at > MAX_AGE_S:
                continue
            if skip is not None and edit.key == skip[0] and skip[1] <= edit.line <= skip[2]:
                continue
            out.append((edit.key, max(0, edit.line - AROUND_LINES), edit.line + AROUND_LINES))
            if len(out) == MAX_RANGES:
                break
        return out
