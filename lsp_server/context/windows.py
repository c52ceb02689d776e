"""Windows of open files ranked by Jaccard similarity to the lines before the cursor
(Copilot's "neighboring tabs": 60-line windows, best 4, at most one per file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lsp_server.context.identifiers import identifiers, jaccard

WINDOW_LINES = 60
STRIDE_LINES = 30
TARGET_LINES = 50  # the last lines of the prefix the windows are compared with
MAX_FILES = 20
MAX_FILE_LINES = 10_000
TOP_WINDOWS = 4
NEAR_DUPLICATE = 0.9  # a window this similar to the cursor's own lines adds nothing


@dataclass(frozen=True)
class Window:
    key: str  # the document's uri
    start: int  # 0-based first line
    end: int  # 0-based line after the last
    ids: frozenset[str]


@dataclass(frozen=True)
class Scored:
    score: float
    window: Window
    lines: tuple[str, ...]  # the document's lines (the window's text is lines[start:end])


class _FileIndex:
    """The windows of one document at one version."""

    def __init__(self, key: str, version: object, text: str):
        self.version = version
        self.lines = tuple(text.split("\n")[:MAX_FILE_LINES])
        starts = range(0, max(1, len(self.lines) - WINDOW_LINES + STRIDE_LINES), STRIDE_LINES)
        self.windows = [
            Window(key, s, min(s + WINDOW_LINES, len(self.lines)),
                   identifiers(list(self.lines[s : s + WINDOW_LINES])))
            for s in starts
        ]


class WindowIndex:
    """Per-document window sets, rebuilt only for documents whose version changed."""

    def __init__(self) -> None:
        self._files: dict[str, _FileIndex] = {}

    def forget(self, key: str) -> None:
        self._files.pop(key, None)

    def index(self, key: str, version: object, text: Callable[[], str]) -> _FileIndex:
        """The document's windows; `text` is read only when the version changed."""
        entry = self._files.get(key)
        if entry is None or entry.version != version or version is None:
            entry = self._files[key] = _FileIndex(key, version, text())
        return entry

    def best(
        self,
        target_lines: list[str],
        files: list[tuple[str, object, Callable[[], str]]],
        own: tuple[str, int, int] | None,
        top: int = TOP_WINDOWS,
    ) -> list[Scored]:
        """The `top` windows most similar to `target_lines`, one per file, best first.
        `files`: (key, version, text getter) in priority order (at most MAX_FILES are read); `own`:
        (key, first, last line) of the request's own context, whose windows are skipped."""
        target = identifiers(target_lines[-TARGET_LINES:])
        if not target:
            return []
        best_per_file: list[Scored] = []
        for key, version, text in files[:MAX_FILES]:
            entry = self.index(key, version, text)
            best: Scored | None = None
            for window in entry.windows:
                if own is not None and key == own[0] and window.start <= own[2] and (
                    window.end > own[1]
                ):
                    continue
                score = jaccard(target, window.ids)
                if score <= 0.0 or score >= NEAR_DUPLICATE:
                    continue
                if best is None or score > best.score:
                    best = Scored(score, window, entry.lines)
            if best is not None:
                best_per_file.append(best)
        best_per_file.sort(key=lambda s: (-s.score, s.window.key, s.window.start))
        return best_per_file[:top]
