"""Files inside the workspace folders, and nothing else: every path is resolved (symlinks
included) and must stay under a folder's own resolved path before it is read."""

from __future__ import annotations

import os
from pathlib import Path

MAX_FILE_BYTES = 1_000_000


class WorkspaceFiles:
    def __init__(self, roots: list[Path]):
        self.roots = [Path(os.path.realpath(root)) for root in roots]
        self._cache: dict[Path, tuple[tuple[int, int], str]] = {}

    def inside(self, path: Path) -> Path | None:
        """`path` resolved, when it and every link on the way stay within a root."""
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            return None
        for root in self.roots:
            if real == root or root in real.parents:
                return real
        return None

    def relative(self, path: Path) -> str:
        """`path` relative to its workspace folder, "/"-separated (the display path)."""
        real = Path(os.path.realpath(path))
        for root in self.roots:
            if real == root or root in real.parents:
                return real.relative_to(root).as_posix()
        return real.name

    def read(self, path: Path) -> str | None:
        """The text of a regular file inside the workspace (cached by mtime and size); None
        when outside, missing, too large or not UTF-8."""
        real = self.inside(path)
        if real is None:
            return None
        try:
            stat = real.stat()
            if not real.is_file() or stat.st_size > MAX_FILE_BYTES:
                return None
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(real)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            text = real.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        self._cache[real] = (stamp, text)
        return text
