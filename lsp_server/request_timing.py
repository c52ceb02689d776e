"""What the server adds around the engine for one completion request (issue 23's "server
overhead"), measured inside the server: from the request's body in hand (rpc.receive) to its
response written (rpc._send_handler_result), minus the engine's own time (engine.complete
as the worker timed it). Also the CPU time the event loop's thread spent meanwhile, which
load on the machine does not inflate, and the CPU time of the work done for the request on
other threads (the hole's syntax check, built while the model runs; the rows' cut, on the
thread that answers the job, right after the model).

The request's RequestTiming travels with its handler through a context variable: rpc sets it
around the dispatch, and the handler's task, created inside, keeps it (asyncio copies the
context into a new task).
"""

from __future__ import annotations

import contextvars
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

TIMED_METHODS = frozenset({"textDocument/inlineCompletion", "textDocument/completion"})
KEEP = 64  # the status shows the last this many timed requests
MAX_OPEN = 1024  # timed requests awaiting their answer at most (the oldest is forgotten)
# A file name: the server cProfiles its event loop's thread into it (lsp_server/__main__.py)
PROFILE_ENV = "MASKFILL_PROFILE"

current: contextvars.ContextVar[RequestTiming | None] = contextvars.ContextVar(
    "maskfill_request_timing", default=None)


@dataclass
class RequestTiming:
    method: str
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=time.thread_time)
    engine_ms: float | None = None  # set when the request ran the model
    offloaded_cpu_ms: float = 0.0  # CPU time of its work on other threads (syntax check, cut)

    def finish(self) -> dict[str, Any]:
        wall_ms = (time.perf_counter() - self.started) * 1000
        engine_ms = self.engine_ms or 0.0
        return {
            "method": self.method,
            "wallMs": round(wall_ms, 3),
            "engineMs": None if self.engine_ms is None else round(self.engine_ms, 3),
            "overheadMs": round(wall_ms - engine_ms, 3),
            "loopCpuMs": round((time.thread_time() - self.started_cpu) * 1000, 3),
            "offloadedCpuMs": round(self.offloaded_cpu_ms, 3),
        }


def engine_ran(engine_ms: float | None) -> None:
    """The request being handled ran the model for `engine_ms`."""
    timing = current.get()
    if timing is not None and engine_ms is not None:
        timing.engine_ms = (timing.engine_ms or 0.0) + engine_ms


def timed_in_thread(timing: RequestTiming | None, function, *args):
    """Run `function(*args)` (on an executor thread), adding its CPU time to `timing`."""
    started = time.thread_time()
    try:
        return function(*args)
    finally:
        if timing is not None:
            timing.offloaded_cpu_ms += (time.thread_time() - started) * 1000


class RequestTimings:
    """The last KEEP timed requests, newest last (the event loop's thread only)."""

    def __init__(self) -> None:
        self.open: dict[Any, RequestTiming] = {}  # by JSON-RPC id, until answered
        self.recent: deque[dict[str, Any]] = deque(maxlen=KEEP)

    def begin(self, msg_id: Any, method: str, started: float, started_cpu: float) -> RequestTiming:
        if len(self.open) >= MAX_OPEN:  # one never answered through _send_handler_result
            self.open.pop(next(iter(self.open)))
        timing = self.open[msg_id] = RequestTiming(method, started, started_cpu)
        return timing

    def end(self, msg_id: Any) -> None:
        timing = self.open.pop(msg_id, None)
        if timing is not None:
            self.recent.append(timing.finish())
