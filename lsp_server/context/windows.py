"""Windows of open files ranked by Jaccard similarity to the lines before the cursor
(Copilot's "neighboring tabs": 60-line windows, best 4, at most one per file)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

from lsp_server.context.identifiers import identifiers

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
    """The windows of one document at one version, with an inverted index (identifier ->
    windows holding it), so scoring a file costs one pass over the postings of the target's
    identifiers instead of a set intersection per window."""

    def __init__(self, key: str, version: object, text: str):
        self.version = version
        self.lines = tuple(text.split("\n")[:MAX_FILE_LINES])
        starts = range(0, max(1, len(self.lines) - WINDOW_LINES + STRIDE_LINES), STRIDE_LINES)
        self.windows = [
            Window(key, s, min(s + WINDOW_LINES, len(self.lines)),
                   identifiers(list(self.lines[s : s + WINDOW_LINES])))
            for s in starts
        ]
        self.sizes = [len(window.ids) for window in self.windows]
        self.postings: dict[str, list[int]] = {}
        for index, window in enumerate(self.windows):
            for name in window.ids:
                self.postings.setdefault(name, []).append(index)

    def overlaps(self, index: int, first: int, last: int) -> bool:
        window = self.windows[index]
        return window.start <= last and window.end > first

    def common_counts(self, target: frozenset[str]) -> Counter[int]:
        """Window index -> how many of `target`'s identifiers it holds (only windows > 0)."""
        postings = self.postings
        return Counter(chain.from_iterable(postings[name] for name in target if name in postings))


class WindowIndex:
    """Per-document window sets, rebuilt only for documents whose version changed."""

    def __init__(self) -> None:
        self._files: dict[str, _FileIndex] = {}

    def forget(self, key: str) -> None:
        self._files.pop(key, None)

    def index(
        self,
        key: str,
        version: object,
        text: Callable[[], str],
        may_build: Callable[[], bool] = lambda: True,
    ) -> _FileIndex | None:
        """The document's windows; `text` is read only when the version changed. None when
        they must be built and `may_build()` says no (out of time: a later call builds them)."""
        entry = self._files.get(key)
        if entry is None or entry.version != version or version is None:
            if not may_build():
                return None
            entry = self._files[key] = _FileIndex(key, version, text())
        return entry

    def best(
        self,
        target_lines: list[str],
        files: list[tuple[str, object, Callable[[], str]]],
        own: tuple[str, int, int] | None,
        top: int = TOP_WINDOWS,
        time_left: Callable[[], bool] = lambda: True,
    ) -> list[Scored]:
        """The `top` windows most similar to `target_lines`, one per file, best first.
        `files`: (key, version, text getter) in priority order (at most MAX_FILES are read); `own`:
        (key, first, last line) of the request's own context, whose windows are skipped;
        `time_left`: whether a file may still be indexed now."""
        target = identifiers(target_lines[-TARGET_LINES:])
        if not target:
            return []
        best_per_file: list[Scored] = []
        for key, version, text in files[:MAX_FILES]:
            # Indexing a 2k-line file costs ~20 ms: out of time, files not indexed yet wait
            # for a later request; those already indexed still count.
            entry = self.index(key, version, text, may_build=time_left)
            if entry is None:
                continue
            sizes = entry.sizes
            size = len(target)
            scores = [
                (common / (size + sizes[index] - common), -index)
                for index, common in entry.common_counts(target).items()
                if own is None or key != own[0] or not entry.overlaps(index, own[1], own[2])
            ]
            scores = [item for item in scores if item[0] < NEAR_DUPLICATE]
            best = None
            if scores:
                score, negative = max(scores)
                best = Scored(score, entry.windows[-negative], entry.lines)
            if best is not None:
                best_per_file.append(best)
        best_per_file.sort(key=lambda s: (-s.score, s.window.key, s.window.start))
        return best_per_file[:top]
