"""Every process a supervised step started, found again so that it can be ended.

A step's process group is not enough: the shared engine is started in a session of its own
(`start_new_session`, engine/serve/launcher.py), so a `killpg` at a step's time cap left it
running, holding GPU memory into the next step. Two ways find such processes on Linux:
- this process becomes a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so a descendant
  whose parent dies is re-parented here instead of to init: whatever /proc shows with a parent
  chain that leads here is ours;
- each step runs with a token in its environment, which every descendant inherits (the engine
  launcher copies os.environ): a process carrying it is ours wherever it was re-parented.
Without /proc (not Linux) only the step's own process group is ended.
Used by engine/bench/gpu_check.py (no torch, no third-party import: it runs before anything is
installed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

TOKEN_ENV = "MASKFILL_STEP_TOKEN"
PR_SET_CHILD_SUBREAPER = 36
PROC = Path("/proc/")


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[1])


def _pids() -> list[int]:
    try:
        return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []


def descendants(root: int) -> set[int]:
    """Live processes whose parent chain leads to root (zombies included)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def carrying(token: str) -> set[int]:
    """Processes whose environment holds this step's token."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found = set()
    for pid in _pids():
        with contextlib.suppress(OSError):
            if needle in (PROC / str(pid) / "environ").read_bytes().split(b"\0"):
                found.add(pid)
    return found


def end_step(token: str, leader: int | None, keep_status_of: int | None = None,
             timeout: float = 5.0) -> list[int]:
    """SIGKILL every process of a step: the leader's group, this process's descendants (the
    caller runs one step at a time, so they are all the step's) and every process carrying the
    token; reap the ones that are our children (except keep_status_of, whose exit status its
    Popen reads). Returns the pids ended."""
    me = os.getpid()
    if leader is not None:
        with contextlib.suppress(OSError):
            os.killpg(leader, signal.SIGKILL)
    ended: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        alive = set()
        for pid in (descendants(me) | carrying(token)) - {me}:
            stat = _stat(pid)
            if stat is None:
                continue
            if stat[0] == "Z":  # dead; ours to reap when it is our child
                if pid != keep_status_of:
                    with contextlib.suppress(OSError):
                        os.waitpid(pid, os.WNOHANG)
                continue
            alive.add(pid)
        if not alive or time.monotonic() > deadline:
            return sorted(ended | alive)
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        ended |= alive
        time.sleep(0.05)
