"""The LSP server's engine host: the LSP-facing adapter over engine/serve/host.py `EngineHost`
(the one thread that owns the model, loads it, hands completion jobs to runners and frees it;
the shared engine process is the same host). What is the LSP server's own here: the loader (an
in-process engine, or a client of a shared or remote one), its events, the retries and the
fallback device, and the counters of `maskfill.status`.

Keeping the engine off the asyncio loop lets the server answer `initialize`, `didChange` and
cancellations while a model loads or denoises. When the engine takes concurrent calls
(`concurrent_calls`: the in-process engine shares its denoising passes between them, the shared
engine and a remote endpoint serve each on its own), up to MAX_IN_FLIGHT jobs run at once, each
on its own runner thread, so documents of one window are served together instead of in turn;
any other engine gets one job at a time, on the owning thread. Newest wins per document (the
one rule, engine/serve/newest_wins.py): submitting a job for a document drops its pending one
and flags its running one (its cancel Event is checked by the engine between denoising steps)
and starts once that one has stopped, so a burst of keystrokes costs at most a couple of runs.

The queue is bounded across documents too: beyond MAX_PENDING_JOBS waiting jobs (running ones,
and those an idle runner takes at once, not counted) the oldest is dropped, so a request never
waits behind a backlog of work nobody is looking at any more.

The model is never freed or replaced under a runner: a (re)load drops the waiting jobs, flags
the running ones and waits for their runners to return before it frees the old model, and so
does close() before it frees the model.

When a run fails (out of memory, say) the job is retried once with half the span budget; if
that fails too, the job answers nothing. A transient failure never moves the model: only a load
failure, or FALLBACK_AFTER_FAILURES failed runs in a row with no success between them, moves
it to the configured fallback device (until the next load, e.g. a settings change). That move
happens on the owning thread once the runners still on the old device have returned, and the
job that tipped it over is retried there first. A request the engine refuses as bad input
(EngineInputError: text it cannot tokenize, a context that does not fit) is answered with
nothing and counts as no failure: it says nothing about the device. Nor is a run retried when
the engine cannot answer now (EngineUnavailable: a shared engine silent past the deadline or
restarting, a remote endpoint refusing the token): the job answers nothing at once.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.api import (
    CompletionRequest,
    CompletionResult,
    EngineAuthError,
    EngineError,
    EngineInputError,
    EngineLike,
    EngineUnavailable,
    QuantMode,
    one_line,
)
from engine.serve.host import EngineHost, Job, Reply

log = logging.getLogger(__name__)

FALLBACK_AFTER_FAILURES = 4  # consecutive failed runs before moving to the fallback device
# Jobs running at once on an engine that takes concurrent calls: the documents a window shows
# side by side, each a few rows of a shared pass (the CPU engine's pass budget is 32 rows).
MAX_IN_FLIGHT = 4
MAX_PENDING_JOBS = 2  # waiting jobs, all documents together (beyond the running ones)
# The key in a result's stats.timings_ms under which the host puts engine.complete's wall time.
CALL_MS = "call"
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
    ca_file: str | None = None  # checks a tls:// or https:// engine's certificate (engineCaFile)
    idle_exit_s: float = 300.0  # an auto-started shared engine's wait after its last client
    context_reuse: bool = True  # keep recent contexts' K/V across requests (in-process engine)


Loader = Callable[[LoadSpec], EngineLike]
# (kind, payload): load-begin, load-end, load-failed, engine-error, engine-auth; called on the
# worker thread (engine-error and engine-auth also on a job's runner thread).
EventSink = Callable[[str, dict[str, Any]], None]


class NoModelConfigured(EngineError):
    """Neither a `model` setting nor an embedded model: no device would help."""


def default_model_path() -> str | None:
    """The embedded model that ships in engine/model/embedded/, when this build has one."""
    try:
        from engine.model.embedded_model import default_model_path as embedded_path
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


class WorkerStats:
    """Counters for maskfill.status and the bench; runner threads update them concurrently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.model_runs = 0  # engine.complete calls started
        self.dropped = 0  # jobs cancelled or superseded before reaching the model
        self.cancelled_runs = 0  # runs stopped between denoising steps
        self.failures = 0
        self.forward_passes = 0
        self.committed_tokens = 0
        self.peak_in_flight = 0  # most jobs running at once
        self.peak_batch_rows = 0  # most rows a finished run shared a pass with (its own included)
        self.engine_ms: deque[float] = deque(maxlen=1024)  # finished runs, newest last
        self.last_reused_context_tokens = 0  # K/V the last finished run took from the cache
        self.prewarms = 0  # contexts handed to the engine to encode while idle (issue 23)

    def record_start(self) -> None:
        with self._lock:
            self.model_runs += 1

    def record_drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def record_failure(self) -> None:
        with self._lock:
            self.failures += 1

    def record_prewarm(self) -> None:
        with self._lock:
            self.prewarms += 1

    def record_in_flight(self, jobs: int) -> None:
        with self._lock:
            self.peak_in_flight = max(self.peak_in_flight, jobs)

    def record_result(self, result: CompletionResult, elapsed_ms: float, cancelled: bool) -> None:
        with self._lock:
            if cancelled:
                self.cancelled_runs += 1
                return
            self.engine_ms.append(elapsed_ms)
            self.last_reused_context_tokens = result.stats.reused_context_tokens
            self.forward_passes += result.stats.forward_passes
            self.committed_tokens += result.stats.model_tokens
            self.peak_batch_rows = max(self.peak_batch_rows, result.stats.batch_rows)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latencies = sorted(self.engine_ms)
            recent = [round(ms, 3) for ms in self.engine_ms]
            counts = {
                "modelRuns": self.model_runs,
                "droppedJobs": self.dropped,
                "cancelledRuns": self.cancelled_runs,
                "failures": self.failures,
                "peakJobsInFlight": self.peak_in_flight,
                "peakBatchRows": self.peak_batch_rows,
                "lastReusedContextTokens": self.last_reused_context_tokens,
                "prewarms": self.prewarms,
                "forwardPassesPerToken": (
                    round(self.forward_passes / self.committed_tokens, 3)
                    if self.committed_tokens
                    else None
                ),
            }

        def percentile(p: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

        return {
            **counts,
            "latencyMsP50": round(statistics.median(latencies), 2) if latencies else None,
            "latencyMsP95": percentile(0.95),
            "recentEngineMs": recent,
        }


@dataclass(frozen=True)
class Fallback:
    """A reload asked for by a runner after repeated failures: the same model on `spec`'s
    (fallback) device, the job that tipped it over run first there."""

    spec: LoadSpec


class LspEngineHost(EngineHost):
    """The LSP server's engine host (engine/serve/host.py), one client, a job per document;
    this adapter adds the loader and its events, the retries and the fallback device. All
    public methods are safe to call from any thread."""

    inline_single = True  # an engine that takes one call at a time runs it on this thread
    one_run_per_key = True  # a burst of keystrokes costs a couple of runs, as newest-wins intends

    def __init__(self, loader: Loader = load_engine, on_event: EventSink | None = None):
        super().__init__(name="maskfill-engine", max_in_flight=1)
        self._loader = loader
        self._on_event = on_event or (lambda kind, payload: None)
        self._spec: LoadSpec | None = None
        self.stats = WorkerStats()
        self._failures_in_a_row = 0
        self._auth_refused = False  # the last request's token was refused (self.error says it)
        self.start()

    # -- called from the server ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def device(self) -> str | None:
        return self._spec.device if self._spec else None

    def load(self, spec: LoadSpec) -> None:
        """(Re)load in the background; waiting jobs are dropped and running ones stopped (they
        were for the old model), and the old model is freed once their runners returned."""
        with self._lock:
            self.state = "loading"
            self.request_load(spec, drop_waiting=True)  # replaces a pending fallback too

    def _on_prewarm(self) -> None:
        self.stats.record_prewarm()

    def submit(self, key: str, request: CompletionRequest,  # type: ignore[override]
               reply: Reply | None = None) -> Job:
        """Queue `request` for document `key`. `reply(result, error)`, if given, is called
        once by the thread that answers the job: a runner right after the model (or, for a
        job dropped at once, this one)."""
        job = Job(key=key, request=request, reply=reply)
        super().submit(job)
        return job

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop the thread and free the model (engine.close()) once the running jobs, flagged
        here, have returned, waiting at most `timeout` seconds for it (0: do not wait). A load
        in progress is not waited for: the thread frees what it loaded when the load returns
        (or the process ends first)."""
        super().close(timeout)

    # -- host hooks (lock held where the host holds it) ----------------------------------

    def _on_drop(self, job: Job) -> None:
        self.stats.record_drop()

    def _can_run(self) -> bool:
        return True  # with no model (not loaded, or its load failed) a job is dropped at once

    def _on_start(self, in_flight: int) -> None:
        self.stats.record_in_flight(in_flight)

    def _max_waiting(self) -> int | None:
        # Newest wins across documents too; a job an idle runner takes at once is not waiting.
        if self._pending_load is not None:
            return MAX_PENDING_JOBS
        return MAX_PENDING_JOBS + max(0, self.max_in_flight - len(self._running)
                                      - len(self._front))

    def _free(self) -> None:
        self.max_in_flight = 1
        super()._free()

    # -- the owning thread ---------------------------------------------------------------

    def _load_task(self, task: LoadSpec | Fallback) -> None:
        self._load(task.spec if isinstance(task, Fallback) else task)

    def _load(self, spec: LoadSpec) -> None:
        self.info = None
        devices = [spec.device]
        if spec.fallback_device and spec.fallback_device != spec.device:
            devices.append(spec.fallback_device)
        errors = []
        for device in devices:
            attempt = dataclasses.replace(spec, device=device)
            self._on_event("load-begin", {"model": model_name(spec), "device": device})
            started = time.perf_counter()
            try:
                engine = self._loader(attempt)
            except NoModelConfigured as exc:
                errors = [str(exc)]
                break
            except Exception as exc:  # EngineError, OOM, a broken checkpoint: report, keep serving
                errors.append(f"{device}: {one_line(exc)}")
                log.warning("loading %s on %s failed: %s", model_name(spec), device, exc)
                continue
            with self._lock:
                superseded = isinstance(self._pending_load, LoadSpec) or self._closing
                self._engine, self._spec = engine, attempt
                # An engine that does not say it takes concurrent calls gets one at a time.
                concurrent = bool(getattr(engine, "concurrent_calls", False))
                self.max_in_flight = MAX_IN_FLIGHT if concurrent else 1
                self._failures_in_a_row = 0
            self.info = engine.info()
            self.error = None
            self._auth_refused = False
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

    # -- a runner thread -----------------------------------------------------------------

    def _serve_job(self, job: Job) -> tuple[CompletionResult | None, str | None] | None:
        try:
            return self._complete(job)
        except Exception:  # a bug in one job must not take its thread (or the worker) down
            log.exception("engine worker job failed")
            self._drop(job)
            return None

    def _complete(self, job: Job) -> tuple[CompletionResult | None, None] | None:
        request, attempt = job.request, job.attempt
        engine = self._engine  # not replaced while this job is in self._running
        if job.cancel.is_set() or engine is None:
            self._drop(job)  # flagged jobs never reach the model
            return None
        while True:
            try:
                result = self._timed_run(engine, job, request)
            except EngineInputError as exc:  # this request alone is bad: not the device's fault
                log.warning("completion refused: %s", one_line(exc))
                break
            except EngineUnavailable as exc:  # silent, restarting, or refusing our token:
                self._unavailable(exc)  # a shorter span would not help, the device is fine
                break
            except Exception as exc:  # any engine failure must leave the server serving
                self.stats.record_failure()
                with self._lock:
                    self._failures_in_a_row += 1
                    repeated = self._failures_in_a_row >= FALLBACK_AFTER_FAILURES
                message = one_line(exc)
                log.warning("completion failed (attempt %d): %s", attempt + 1, message)
                self._on_event("engine-error", {"message": f"maskfill: {message}"})
                if job.cancel.is_set():
                    break
                if attempt == 0 and request.max_tokens > 1:  # first retry: half the span budget
                    request = dataclasses.replace(
                        request, max_tokens=max(1, request.max_tokens // 2), span_lengths=None
                    )
                    attempt = 1
                    continue
                if attempt == 1 and repeated and self._retry_on_fallback(job, request):
                    return None
                break
            with self._lock:
                self._failures_in_a_row = 0
                if self._auth_refused:  # the endpoint takes our token again
                    self._auth_refused = False
                    self.error = None
            return result, None
        self._drop(job)
        return None

    def _unavailable(self, exc: EngineUnavailable) -> None:
        """An engine that cannot answer now: counted and said, never retried. A refused token
        is said once (an error the user must fix) and stays in the status until a request
        succeeds; the rest go through the server's repeat limiter."""
        self.stats.record_failure()
        message = f"maskfill: {one_line(exc)}"
        log.warning("completion failed: %s", message)
        if isinstance(exc, EngineAuthError):
            with self._lock:
                self._auth_refused = True
                self.error = message
            self._on_event("engine-auth", {"message": message})
        else:
            self._on_event("engine-error", {"message": message})

    def _timed_run(self, engine: EngineLike, job: Job,
                   request: CompletionRequest) -> CompletionResult:
        self.stats.record_start()
        started = time.perf_counter()
        if getattr(engine, "keyed_calls", False):  # a remote endpoint: the session header
            result = engine.complete(request, job.cancel, key=job.key)
        else:
            result = engine.complete(request, job.cancel)
        elapsed_ms = (time.perf_counter() - started) * 1000
        # The request's own measure of the engine's time (lsp_server/request_timing.py).
        result.stats.timings_ms[CALL_MS] = elapsed_ms
        cancelled = result.stats.cancelled or job.cancel.is_set()
        self.stats.record_result(result, elapsed_ms, cancelled)
        return result

    def _retry_on_fallback(self, job: Job, request: CompletionRequest) -> bool:
        """After repeated failures: ask the owning thread to move the model to the fallback
        device (a runner never loads: others may still be running on this model) and queue
        `job` (its last request, as the last try) to go first there. False when there is no
        other device, or a load or close already decides what happens next."""
        with self._lock:
            spec = self._spec
            if (self._closing or isinstance(self._pending_load, LoadSpec) or spec is None
                    or spec.fallback_device in (None, spec.device)):
                return False
            if self._pending_load is None:
                self.request_load(Fallback(dataclasses.replace(spec, device=spec.fallback_device)),
                                  drop_waiting=False)
            job.request, job.attempt = request, 2
            self.run_first(job)
            return True


