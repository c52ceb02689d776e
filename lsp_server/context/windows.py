"""Windows of open files ranked by Jaccard similarity to the lines before the cursor
(Copilot's "neighboring tabs": 60-line windows, best 4, at most one per file).

Identifiers are numbered once per index (a vocabulary shared by every file), each window keeps
the sorted ids it holds, and a file's windows sit in one CSR-like array: scoring a file is a
few vectorised operations (look the window ids up in the target's mask, count per window)
instead of a Python loop over postings. A document's new version rebuilds only the windows
whose lines changed (a keystroke: one or two windows; a line added: the windows after it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lsp_server.context.identifiers import identifiers

if TYPE_CHECKING:
    import numpy as np

WINDOW_LINES = 60
STRIDE_LINES = 30
TARGET_LINES = 50  # the last lines of the prefix the windows are compared with
MAX_FILES = 20
MAX_FILE_LINES = 10_000
TOP_WINDOWS = 4
NEAR_DUPLICATE = 0.9  # a window this similar to the cursor's own lines adds nothing
MAX_VOCABULARY = 1 << 18  # identifiers numbered before the index starts afresh (~40 MB)
# numpy is imported at the first indexing, not with the server: a server without an
# in-process engine (shared, remote) would otherwise load it at start for nothing.


@dataclass(frozen=True)
class Window:
    key: str  # the document's uri
    start: int  # 0-based first line
    end: int  # 0-based line after the last


@dataclass(frozen=True)
class Scored:
    score: float
    window: Window
    lines: tuple[str, ...]  # the document's lines (the window's text is lines[start:end])


class Vocabulary:
    """Identifier -> a small int, for every file of one index."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def numbered(self, names: frozenset[str]) -> np.ndarray:
        import numpy as np

        ids = self.ids
        out = np.fromiter((ids.setdefault(name, len(ids)) for name in names), dtype=np.int32,
                          count=len(names))
        out.sort()
        return out

    def known(self, names: frozenset[str]) -> np.ndarray:
        """The ids of `names` that some window holds (an unnumbered name matches nothing)."""
        import numpy as np

        ids = self.ids
        return np.fromiter((ids[name] for name in names if name in ids), dtype=np.int32)


class _FileIndex:
    """The windows of one document at one version: their sorted identifier ids, end to end in
    `indices`, window i's at indices[bounds[i]:bounds[i + 1]]."""

    def __init__(self, key: str, version: object, text: str, vocabulary: Vocabulary,
                 previous: _FileIndex | None = None):
        import numpy as np

        self.version = version
        self.lines = tuple(text.split("\n")[:MAX_FILE_LINES])
        count = len(self.lines)
        starts = range(0, max(1, count - WINDOW_LINES + STRIDE_LINES), STRIDE_LINES)
        self.windows = [Window(key, s, min(s + WINDOW_LINES, count)) for s in starts]
        old_ids = previous.window_ids if previous is not None else []
        ids: list[np.ndarray] = []
        for index, window in enumerate(self.windows):
            if index < len(old_ids) and _same_lines(previous, index, self.lines, window):
                ids.append(old_ids[index])  # unchanged since the last version
            else:
                ids.append(vocabulary.numbered(
                    identifiers(list(self.lines[window.start : window.end]))))
        self.window_ids = ids
        self.sizes = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
        self.bounds = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.bounds[1:])
        self.indices = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
        self.starts = np.fromiter((w.start for w in self.windows), dtype=np.int64)
        self.ends = np.fromiter((w.end for w in self.windows), dtype=np.int64)

    def common_counts(self, in_target: np.ndarray) -> np.ndarray:
        """Per window: how many of the target's identifiers it holds (`in_target`: a mask over
        the vocabulary)."""
        import numpy as np

        hits = np.zeros(len(self.indices) + 1, dtype=np.int64)
        np.cumsum(in_target[self.indices], out=hits[1:])
        return hits[self.bounds[1:]] - hits[self.bounds[:-1]]


def _same_lines(previous: _FileIndex, index: int, lines: tuple[str, ...], window: Window
                ) -> bool:
    """Whether window `index` holds the same lines as in the previous version."""
    old = previous.windows[index]
    span = slice(window.start, window.end)
    return old.end == window.end and previous.lines[span] == lines[span]


class WindowIndex:
    """Per-document window sets, updated only for documents whose version changed."""

    def __init__(self) -> None:
        self._files: dict[str, _FileIndex] = {}
        self._vocabulary = Vocabulary()

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
            if len(self._vocabulary) > MAX_VOCABULARY:  # numbered afresh, every file again
                self._vocabulary = Vocabulary()
                self._files.clear()
                entry = None
            entry = self._files[key] = _FileIndex(key, version, text(), self._vocabulary,
                                                  previous=entry)
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
        import numpy as np

        target = identifiers(target_lines[-TARGET_LINES:])
        if not target:
            return []
        size = len(target)
        in_target: np.ndarray | None = None
        vocabulary = self._vocabulary
        best_per_file: list[Scored] = []
        for key, version, text in files[:MAX_FILES]:
            # Indexing a 2k-line file costs a few ms: out of time, files not indexed yet wait
            # for a later request; those already indexed still count.
            entry = self.index(key, version, text, may_build=time_left)
            if entry is None or not entry.windows:
                continue
            if in_target is None or vocabulary is not self._vocabulary or len(
                    in_target) < len(self._vocabulary):
                vocabulary = self._vocabulary
                in_target = np.zeros(len(vocabulary), dtype=np.bool_)
                in_target[vocabulary.known(target)] = True
            common = entry.common_counts(in_target)
            # The same float division as common / (size + window - common) in Python.
            scores = common / (size + entry.sizes - common).astype(np.float64)
            keep = (common > 0) & (scores < NEAR_DUPLICATE)
            if own is not None and key == own[0]:
                keep &= ~((entry.starts <= own[2]) & (entry.ends > own[1]))
            if not keep.any():
                continue
            masked = np.where(keep, scores, -1.0)
            index = int(np.argmax(masked))  # the first of equal scores: the earliest window
            best_per_file.append(Scored(float(masked[index]), entry.windows[index], entry.lines))
        best_per_file.sort(key=lambda s: (-s.score, s.window.key, s.window.start))
        return best_per_file[:top]
