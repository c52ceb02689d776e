"""How many connections a listener may hold open: never so many that the file limit leaves
too few descriptors for everything else (issue 20.6). Past the file limit `accept` fails for
every listener alike, the editors' Unix socket included, so each network listener (the HTTP
API, the msgpack `--tcp` one) is capped below it. Torch- and aiohttp-free."""

from __future__ import annotations

import logging
import os

try:
    import resource
except ImportError:  # Windows: no file limit to read
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

RESERVED_FDS = 64  # descriptors always left to the Unix socket's clients and the engine itself
# asyncio accepts up to `backlog` connections per loop pass: a flood past the cap then holds
# about twice this many descriptors for an instant (until the refused ones are closed).
ACCEPT_BACKLOG = 16


def connection_limit(wanted: int, what: str = "HTTP") -> int:
    """At most `wanted` connections, and never so many that the file limit leaves fewer than
    RESERVED_FDS descriptors for everything else."""
    if resource is None:
        return wanted
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - open_descriptors() - RESERVED_FDS
    if room < wanted:
        log.warning("the file limit (%d) leaves room for %d %s connections (raise it with "
                    "`ulimit -n`)", soft, max(1, room), what)
    return max(1, min(wanted, room))


def open_descriptors() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 32
