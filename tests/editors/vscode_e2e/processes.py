"""Process trees read from /proc, and ending them by PID: code-server's extension host starts the
maskfill server, Playwright's driver starts Chromium, and each must end with its test, even a
failed one. Nothing is matched by name across the machine: only descendants of a PID we started.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    argv: tuple[str, ...]

    @property
    def command_line(self) -> str:
        return " ".join(self.argv)


def _read(pid: int) -> Process | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # ended meanwhile
    # The command name in parentheses may hold spaces and ')': the fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has ended; only its parent's wait is missing
        return None
    argv = tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return Process(pid=pid, ppid=int(fields[1]), argv=argv)


def all_processes() -> list[Process]:
    found = (_read(int(entry.name)) for entry in PROC.iterdir() if entry.name.isdigit())
    return [p for p in found if p is not None]


def descendants(root: int) -> list[Process]:
    """Every living process below `root` (children first level first)."""
    children: dict[int, list[Process]] = {}
    for proc in all_processes():
        children.setdefault(proc.ppid, []).append(proc)
    found, frontier = [], [root]
    while frontier:
        below = [child for pid in frontier for child in children.get(pid, [])]
        found.extend(below)
        frontier = [p.pid for p in below]
    return found


def alive(pid: int) -> bool:
    return _read(pid) is not None


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The PIDs still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = [pid for pid in pids if alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [pid for pid in left if alive(pid)]
    return left


def end(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM each PID, then SIGKILL the ones still alive after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        left = [pid for pid in pids if alive(pid)]
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        pids = wait_gone(left, wait)
        if not pids:
            return
