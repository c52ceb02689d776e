"""Files inside the workspace folders, and nothing else: every path is resolved (symlinks
included) and must stay under a folder's own resolved path before it is read."""

from __future__ import annotations

import os
from pathlib import Path

MAX_FILE_BYTES = 1_000_000
MAX_REMEMBERED = 4096  # resolved paths remembered


class WorkspaceFiles:
    def __init__(self, roots: list[Path]):
        self.roots = [Path(os.path.realpath(root)) for root in roots]
        self._cache: dict[Path, tuple[tuple[int, int], str]] = {}
        self._inside: dict[str, Path | None] = {}

    def inside(self, path: Path) -> Path | None:
        """`path` resolved, when it and every link on the way stay within a root.

        Remembered per path until `forget_paths` (the gatherer calls it when a document
        opens, closes or is saved): a link retargeted since can only lead to the file it led
        to before, inside the root, since reads use the resolved path."""
        key = str(path)
        if key in self._inside:
            return self._inside[key]
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            real = None
        found = None
        if real is not None:
            for root in self.roots:
                if real == root or root in real.parents:
                    found = real
                    break
        if len(self._inside) > MAX_REMEMBERED:
            self._inside.clear()
        self._inside[key] = found
        return found

    def forget_paths(self) -> None:
        self._inside.clear()

    def relative(self, path: Path) -> str:
        """`path` relative to its workspace folder, "/"-separated (the display path)."""
        real = self.inside(path)
        if real is None:
            return Path(path).name
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
