"""One thread owns the model: it loads it, runs completion jobs one at a time, and frees it.

Keeping the engine off the asyncio loop lets the server answer `initialize`, `didChange` and
cancellations while a model loads or denoises. Newest wins per document: submitting a job for a
document drops the pending one and flags the running one (its cancel Event is checked by the
engine between denoising steps), so a burst of keystrokes costs at most a couple of model runs.

The queue is bounded across documents too: beyond MAX_PENDING_JOBS waiting jobs the oldest is
dropped, so a request never waits behind a backlog of work nobody is looking at any more.

When a run fails (out of memory, say) the job is retried once with half the span budget; if
that fails too, the job answers nothing. A transient failure never moves the model: only a load
failure, or FALLBACK_AFTER_FAILURES failed runs in a row with no success between them, moves
it to the configured fallback device (until the next load, e.g. a settings change). A request
the engine refuses as bad input (EngineInputError: text it cannot tokenize, a context that does
not fit) is answered with nothing and counts as no failure: it says nothing about the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.api import (
    CompletionRequest,
    CompletionResult,
    EngineError,
    EngineInfo,
    EngineInputError,
    EngineLike,
    QuantMode,
)

log = logging.getLogger(__name__)

FALLBACK_AFTER_FAILURES = 4  # consecutive failed runs before moving to the fallback device
MAX_PENDING_JOBS = 2  # waiting jobs, all documents together (one more may be running)
CLOSE_WAIT_S = 5.0  # close(): the longest wait for the thread to free the model, by default


@dataclass(frozen=True)
class LoadSpec:
    model: str | None  # None: the embedded default model
    device: str = "cpu"
    quant: QuantMode = "none"
    fallback_device: str | None = None
    mode: str = "inprocess"  # auto | inprocess | shared | remote (lsp_server/engine_client.py)
    endpoint: str | None = None
    token_file: str | None = None
    idle_exit_s: float = 300.0  # an auto-started shared engine's wait after its last client
    context_reuse: bool = True  # keep recent contexts' K/V across requests (in-process engine)


Loader = Callable[[LoadSpec], EngineLike]
# (kind, payload): load-begin, load-end, load-failed, engine-error; called on the worker thread.
EventSink = Callable[[str, dict[str, Any]], None]


class NoModelConfigured(EngineError):
    """Neither a `model` setting nor an embedded model: no device would help."""


def default_model_path() -> str | None:
    """The embedded model that ships in engine/embedded/, when this build has one."""
    try:
        from engine.embedded_model import default_model_path as embedded_path
    except ImportError:
        return None
    path = embedded_path()
    return str(path) if path else None


def model_name(spec: LoadSpec) -> str:
    """What a log line or message calls the model: its setting, or the embedded model."""
    if spec.model:
        return spec.model
    path = default_model_path()
    return f"the embedded model ({path})" if path else "the embedded model"


def load_engine(spec: LoadSpec) -> EngineLike:
    """The real loader: imports the engine (and torch) lazily, on the worker thread; or, in
    the shared and remote modes, connects to an engine in another process."""
    from lsp_server.engine_client import make_engine, resolve_mode

    if resolve_mode(spec.mode, spec.device) != "inprocess":
        return make_engine(spec)
    model = spec.model or default_model_path()
    if model is None:
        raise NoModelConfigured(
            "no model configured: this install has no embedded model; set the `model` setting "
            "to a checkpoint folder or repo id"
        )
    from engine.engine import Engine

    engine = Engine.load(model, device=spec.device, quant=spec.quant,
                         context_reuse=spec.context_reuse)
    engine.use_cpu_threads()  # the server process exists to run this engine
    return engine


@dataclass
class Job:
    key: str  # the document's uri: newest wins per key
    request: CompletionRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[CompletionResult | None] = field(default_factory=Future)


class WorkerStats:
    """Counters for maskfill.status and the bench; written by the worker thread only."""

    def __init__(self) -> None:
        self.model_runs = 0  # engine.complete calls started
        self.dropped = 0  # jobs cancelled or superseded before reaching the model
        self.cancelled_runs = 0  # runs stopped between denoising steps
        self.failures = 0
        self.forward_passes = 0
        self.committed_tokens = 0
        self.engine_ms: deque[float] = deque(maxlen=1024)  # finished runs, newest last

    def snapshot(self) -> dict[str, Any]:
        latencies = sorted(self.engine_ms)

        def percentile(p: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

        return {
            "modelRuns": self.model_runs,
            "droppedJobs": self.dropped,
            "cancelledRuns": self.cancelled_runs,
            "failures": self.failures,
            "latencyMsP50": round(statistics.median(latencies), 2) if latencies else None,
            "latencyMsP95": percentile(0.95),
            "forwardPassesPerToken": (
                round(self.forward_passes / self.committed_tokens, 3)
                if self.committed_tokens
                else None
            ),
            "recentEngineMs": [round(ms, 3) for ms in self.engine_ms],
        }


class EngineWorker:
    """The thread that owns the engine. All public methods are safe to call from any thread."""

    def __init__(self, loader: Loader = load_engine, on_event: EventSink | None = None):
        self._loader = loader
        self._on_event = on_event or (lambda kind, payload: None)
        self._lock = threading.Condition()
        self._pending: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._load_request: LoadSpec | None = None
        self._closing = False
        self._engine: EngineLike | None = None
        self._spec: LoadSpec | None = None
        self.state = "unloaded"  # unloaded | loading | ready | failed | closed
        self.info: EngineInfo | None = None
        self.error: str | None = None
        self.stats = WorkerStats()
        self._failures_in_a_row = 0
        self._in_loader = False  # a load cannot be interrupted: close() does not wait for one
        self._thread = threading.Thread(target=self._run, name="maskfill-engine", daemon=True)
        self._thread.start()

    # -- called from the server ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def device(self) -> str | None:
        return self._spec.device if self._spec else None

    def load(self, spec: LoadSpec) -> None:
        """(Re)load in the background; pending jobs are dropped (they were for the old model)."""
        with self._lock:
            self._load_request = spec
            self.state = "loading"
            for job in self._pending.values():
                self._drop(job)
            self._pending.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._lock.notify()

    def submit(self, key: str, request: CompletionRequest) -> Job:
        job = Job(key=key, request=request)
        with self._lock:
            if self._closing:
                self._drop(job)
                return job
            previous = self._pending.pop(key, None)
            if previous is not None:
                self._drop(previous)
            if self._running is not None and self._running.key == key:
                self._running.cancel.set()
            self._pending[key] = job
            while len(self._pending) > MAX_PENDING_JOBS:  # newest wins across documents too
                _, oldest = self._pending.popitem(last=False)
                self._drop(oldest)
            self._lock.notify()
        return job

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop the thread and free the model (engine.close()), waiting at most `timeout`
        seconds for it (0: do not wait). A load in progress is not waited for: the thread
        frees what it loaded when the load returns (or the process ends first)."""
        with self._lock:
            self._closing = True
            for job in self._pending.values():
                self._drop(job)
            self._pending.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._lock.notify()
        if timeout > 0 and not self._in_loader and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------------

    def _drop(self, job: Job) -> None:
        job.cancel.set()
        _resolve(job, None)
        self.stats.dropped += 1

    def _next_task(self) -> LoadSpec | Job | None:
        with self._lock:
            while not self._closing and self._load_request is None and not self._pending:
                self._lock.wait()
            if self._closing:
                return None
            if self._load_request is not None:
                spec, self._load_request = self._load_request, None
                return spec
            _, job = self._pending.popitem(last=False)
            self._running = job
            return job

    def _run(self) -> None:
        try:
            while (task := self._next_task()) is not None:
                try:
                    if isinstance(task, LoadSpec):
                        self._load(task)
                    else:
                        self._complete(task)
                except Exception:  # a bug in one task must not take the model thread down
                    log.exception("engine worker task failed")
                    if isinstance(task, Job):
                        self._drop(task)
                finally:
                    with self._lock:
                        self._running = None
        finally:
            self._free()
            self.state = "closed"

    def _free(self) -> None:
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception:  # freeing must never raise into shutdown
                log.exception("engine.close() failed")
            self._engine = None
            log.info("model freed")

    def _load(self, spec: LoadSpec) -> None:
        self._free()
        self.info = None
        devices = [spec.device]
        if spec.fallback_device and spec.fallback_device != spec.device:
            devices.append(spec.fallback_device)
        errors = []
        for device in devices:
            attempt = dataclasses.replace(spec, device=device)
            self._on_event("load-begin", {"model": model_name(spec), "device": device})
            started = time.perf_counter()
            self._in_loader = True
            try:
                engine = self._loader(attempt)
            except NoModelConfigured as exc:
                errors = [str(exc)]
                break
            except Exception as exc:  # EngineError, OOM, a broken checkpoint: report, keep serving
                errors.append(f"{device}: {_one_line(exc)}")
                log.warning("loading %s on %s failed: %s", model_name(spec), device, exc)
                continue
            finally:
                self._in_loader = False
            with self._lock:
                superseded = self._load_request is not None or self._closing
            self._engine, self._spec = engine, attempt
            self._failures_in_a_row = 0
            self.info = engine.info()
            self.error = None
            self.state = "ready" if not superseded else self.state
            load_ms = (time.perf_counter() - started) * 1000
            self._on_event(
                "load-end",
                {
                    "info": msgspec.to_builtins(self.info),
                    "ms": load_ms,
                    "device": device,
                    "fellBack": device != spec.device,
                    "reason": "; ".join(errors),  # why the devices before this one failed
                },
            )
            return
        self.state = "failed"
        self.error = "; ".join(errors)
        message = f"maskfill could not load the model ({self.error})"
        self._on_event("load-failed", {"message": message})

    def _complete(self, job: Job) -> None:
        if job.cancel.is_set() or self._engine is None:
            self._drop(job)  # flagged jobs never reach the model
            return
        request = job.request
        for attempt in range(3):
            try:
                result = self._timed_run(job, request)
            except EngineInputError as exc:  # this request alone is bad: not the device's fault
                log.warning("completion refused: %s", _one_line(exc))
                break
            except Exception as exc:  # any engine failure must leave the server serving
                self.stats.failures += 1
                self._failures_in_a_row += 1
                message = _one_line(exc)
                log.warning("completion failed (attempt %d): %s", attempt + 1, message)
                self._on_event("engine-error", {"message": f"maskfill: {message}"})
                request = self._smaller_or_fallback(request, attempt)
                if request is None or job.cancel.is_set():
                    break
                continue
            self._failures_in_a_row = 0
            _resolve(job, result)
            return
        self._drop(job)

    def _timed_run(self, job: Job, request: CompletionRequest) -> CompletionResult:
        assert self._engine is not None
        self.stats.model_runs += 1
        started = time.perf_counter()
        result = self._engine.complete(request, job.cancel)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if result.stats.cancelled or job.cancel.is_set():
            self.stats.cancelled_runs += 1
        else:
            self.stats.engine_ms.append(elapsed_ms)
            self.stats.forward_passes += result.stats.forward_passes
            self.stats.committed_tokens += result.stats.model_tokens
        return result

    def _smaller_or_fallback(
        self, request: CompletionRequest, attempt: int
    ) -> CompletionRequest | None:
        """First retry: half the span budget. Second: reload on the fallback device, but only
        after repeated failures (see the module docstring); otherwise give up on this job."""
        if attempt == 0 and request.max_tokens > 1:
            return msgspec.structs.replace(
                request, max_tokens=max(1, request.max_tokens // 2), span_lengths=None
            )
        spec = self._spec
        repeated = self._failures_in_a_row >= FALLBACK_AFTER_FAILURES
        if attempt >= 1 and repeated and spec and spec.fallback_device not in (None, spec.device):
            self._load(dataclasses.replace(spec, device=spec.fallback_device))
            return request if self._engine is not None else None
        return None


def _resolve(job: Job, value: CompletionResult | None) -> None:
    """Set the job's result unless its waiter already gave up (asyncio cancels the future)."""
    with contextlib.suppress(InvalidStateError):
        if not job.future.done():
            job.future.set_result(value)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
