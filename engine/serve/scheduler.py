"""The model thread of the engine service: loads the model, then runs jobs from every client.

Clients are served fairly in turn: each has its own queue and the thread takes one job from
each client with work, round-robin, so one busy window (or an HTTP script) cannot starve the
others. Newest wins per (client, key), by the one rule of engine/serve/newest_wins.py: a new
job for a key drops that client's pending job for it and stops its running one between
denoising steps, as the in-process worker does per document. Deterministic requests are
answered from the exact cache (engine/serve/exact_cache.py) when asked again. Up to
`max_in_flight` jobs run at once, each on its own thread calling the engine, which batches
them into shared denoising passes (engine/denoise/batch_worker.py).

A request's deadline (timeout_ms) counts from its submission, its wait here included: a job
still queued at its deadline is answered at once with an empty timed-out result, and one that
starts late gets only what is left of its time. Requests the engine refuses as malformed
(EngineInputError: the client's mistake) count as "rejected", not as engine errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from engine.api import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    Draft,
    EngineInfo,
    EngineInputError,
    EngineLike,
)
from engine.serve.exact_cache import ExactCache, request_key
from engine.serve.newest_wins import NewestWins
from engine.serve.stats import ServiceStats

log = logging.getLogger(__name__)

Reply = Callable[[CompletionResult | None, "str | None"], None]


@dataclass(eq=False)
class Job:
    client: int
    id: int
    request: CompletionRequest
    reply: Reply  # called exactly once: (result, None), (None, None) if dropped, (None, error)
    key: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    answered: bool = False
    in_model: bool = False  # past the last check that drops it: a cancel now stops a run
    deadline: float | None = None  # time.monotonic() at submit + timeout_ms (set by submit)
    # Partial fills while the model runs it (Engine.complete's on_draft); a cached answer
    # has none.
    on_draft: Callable[[Draft], None] | None = None

    def left_ms(self) -> float | None:
        if self.deadline is None:
            return None
        return (self.deadline - time.monotonic()) * 1000.0


class FairScheduler:
    """Owns the engine on one thread. Public methods are safe from any thread."""

    def __init__(
        self, load: Callable[[], EngineLike], stats: ServiceStats | None = None,
        cache_size: int = 256, max_in_flight: int = 1,
    ):
        self.stats = stats or ServiceStats()
        self.cache: ExactCache[CompletionResult] = ExactCache(cache_size)
        self.state = "loading"  # loading | ready | failed | closed
        self.error: str | None = None
        self.info: EngineInfo | None = None
        self._load = load
        self._engine: EngineLike | None = None
        self._lock = threading.Condition()
        self._queues: OrderedDict[int, deque[Job]] = OrderedDict()
        self._running: list[Job] = []  # jobs the engine is running now
        self.max_in_flight = max(1, max_in_flight)
        self._runners: list[threading.Thread] = []
        self._closing = False
        # Newest wins per (client, key): an older job is dropped while queued, else stopped.
        self._newest: NewestWins[Job] = NewestWins(self._superseded)
        self._ready = threading.Event()  # set once the load succeeded or failed
        self._thread = threading.Thread(target=self._run, name="maskfill-model", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def submit(self, job: Job) -> None:
        if job.request.timeout_ms is not None:
            job.deadline = time.monotonic() + job.request.timeout_ms / 1000.0
        if self.state == "failed":
            _answer(job, None, f"the model did not load: {self.error}")
            return
        cache_key = request_key(job.request)
        if cache_key is not None and (hit := self.cache.get(cache_key)) is not None:
            self.stats.record_cache(True)
            self.stats.record_outcome("cached")  # a request like any other in /metrics
            self._begin(job)
            self._end(job)
            _answer(job, hit, None)
            return
        with self._lock:
            if self._closing:
                _answer(job, None, "the engine is shutting down")
                return
            self._begin(job)
            self._queues.setdefault(job.client, deque()).append(job)
            self._lock.notify()

    def cancel(self, client: int, job_id: int) -> None:
        with self._lock:
            queue = self._queues.get(client, ())
            for job in list(queue):
                if job.id == job_id:
                    queue.remove(job)
                    self._drop(job)
            for running in self._running:
                if running.client == client and running.id == job_id:
                    running.cancel.set()

    def drop_client(self, client: int) -> None:
        """A connection closed: nobody is left to read its answers."""
        with self._lock:
            for job in self._queues.pop(client, ()):
                self._drop(job)
            for running in self._running:
                if running.client == client:
                    running.cancel.set()

    @property
    def busy(self) -> bool:
        """Whether the engine is running a job right now (one taken from the queue but not yet
        handed to the engine does not count: a cancel then drops it instead of stopping a run)."""
        return any(job.in_model for job in self._running)

    def queue_depth(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values()) + len(self._running)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closing = True
            for queue in self._queues.values():
                for job in queue:
                    self._drop(job)
            self._queues.clear()
            for running in self._running:
                running.cancel.set()
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- helpers (lock held where noted) ---------------------------------------------------

    def _begin(self, job: Job) -> None:
        """Newest wins per (client, key) (engine/serve/newest_wins.py); a job without a key
        competes with nothing."""
        if job.key:
            with self._lock:
                self._newest.begin((job.client, job.key), job)

    def _end(self, job: Job) -> None:
        if job.key:
            with self._lock:
                self._newest.end((job.client, job.key), job)

    def _superseded(self, older: Job) -> None:
        """A newer job for its key came (lock held): dropped while queued, else stopped."""
        queue = self._queues.get(older.client, ())
        if older in queue:
            queue.remove(older)
            self._drop(older)
        else:
            older.cancel.set()

    def _drop(self, job: Job) -> None:
        job.cancel.set()
        if not job.answered:
            self.stats.record_outcome("dropped")
        self._end(job)
        _answer(job, None, None)

    def _expire(self) -> float | None:
        """Answer queued jobs past their deadline (lock held); seconds to the next one."""
        now, soonest = time.monotonic(), None
        for queue in self._queues.values():
            for job in [j for j in queue if j.deadline is not None]:
                if job.deadline <= now:
                    queue.remove(job)
                    job.cancel.set()
                    self.stats.record_outcome("timed_out")
                    self._end(job)
                    _answer(job, timed_out_result(), None)
                elif soonest is None or job.deadline - now < soonest:
                    soonest = job.deadline - now
        return soonest

    def _next(self) -> Job | None:
        with self._lock:
            while not self._closing and (not any(self._queues.values()) or
                                         len(self._running) >= self.max_in_flight):
                self._lock.wait(self._expire())
            if self._closing:
                return None
            for client, queue in self._queues.items():
                if queue:
                    job = queue.popleft()
                    self._queues.move_to_end(client)  # the others go first next time
                    if not queue:
                        del self._queues[client]
                    self._running.append(job)
                    return job
            return None

    # -- the model thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load_engine()
            # Each job runs on its own thread, even one at a time: this one stays in _next,
            # where queued jobs meet their deadline.
            while self.state == "ready" and (job := self._next()) is not None:
                runner = threading.Thread(target=self._serve, args=(job,),
                                          name="maskfill-job", daemon=True)
                self._runners = [t for t in self._runners if t.is_alive()] + [runner]
                runner.start()
            for runner in self._runners:  # cancelled by close(): each stops within a step
                runner.join(30.0)
        finally:
            if self._engine is not None:
                try:
                    self._engine.close()
                except Exception:  # freeing must never raise into shutdown
                    log.exception("engine.close() failed")
                self._engine = None
            self.state = "closed" if self.state != "failed" else "failed"
            self._ready.set()

    def _serve(self, job: Job) -> None:
        outcome: tuple[CompletionResult | None, str | None] = (None, "internal error")
        try:
            outcome = self._complete(job)
        finally:
            with self._lock:
                self._running.remove(job)  # before answering: status must not lag it
                self._end(job)
                self._lock.notify_all()
            _answer(job, *outcome)

    def _load_engine(self) -> None:
        try:
            self._engine = self._load()
            self.info = self._engine.info()
            self.stats.model_loads += 1
            self.state = "ready"
        except Exception as exc:  # a bad checkpoint or OOM: report it to every client
            self.error = _one_line(exc)
            self.state = "failed"
            log.error("loading the model failed: %s", self.error)
        finally:
            self._ready.set()

    def _complete(self, job: Job) -> tuple[CompletionResult | None, str | None]:
        if job.cancel.is_set():  # flagged jobs never reach the model
            self.stats.record_outcome("dropped")
            return None, None
        assert self._engine is not None
        request, left_ms = job.request, job.left_ms()
        if left_ms is not None:
            if left_ms <= 0:  # its deadline passed in the queue
                self.stats.record_outcome("timed_out")
                return timed_out_result(), None
            request = replace(request, timeout_ms=left_ms)
        job.in_model = True
        started = time.perf_counter()
        try:
            if job.on_draft is None:
                result = self._engine.complete(request, job.cancel)
            else:
                result = self._engine.complete(request, job.cancel, on_draft=job.on_draft)
        except EngineInputError as exc:  # the client's mistake, not the engine's
            self.stats.record_outcome("rejected")
            return None, _one_line(exc)
        except Exception as exc:  # one bad request must not take the model thread down
            self.stats.record_outcome("error")
            log.warning("completion failed: %s", exc)
            return None, _one_line(exc)
        seconds = time.perf_counter() - started
        s = result.stats
        if s.cancelled or job.cancel.is_set():
            self.stats.record_outcome("cancelled")
        else:
            outcome = "timed_out" if s.timed_out else "ok"
            self.stats.record_run(outcome, seconds, s.forward_passes, s.model_tokens)
            cache_key = request_key(job.request)
            if cache_key is not None and not s.timed_out:
                self.stats.record_cache(False)
                self.cache.put(cache_key, result)
        return result, None


def timed_out_result() -> CompletionResult:
    """The answer to a job whose deadline passed before the model ran it: nothing, in time."""
    return CompletionResult(text="", candidates=[], stats=CompletionStats(timed_out=True))


def _answer(job: Job, result: CompletionResult | None, error: str | None) -> None:
    if job.answered:
        return
    job.answered = True
    try:
        job.reply(result, error)
    except Exception:  # a broken reply path (closed connection) must not stop the thread
        log.exception("replying to job %s failed", job.id)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
