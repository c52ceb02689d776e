"""The one engine-owning host: a thread that owns the engine (loads it, frees it) and hands
jobs to runner threads. Both the LSP server's in-process engine (lsp_server/engine_host.py) and the
shared engine process (engine/serve/server.py, `ServiceHost` below) are an EngineHost; they add
only their policy (retries and the fallback device; the exact cache, deadlines and counters).

The host keeps, under one lock:
- the waiting jobs, one queue per client, taken round-robin so one busy client (a window, an
  HTTP script) cannot starve the others (the LSP server is a single client);
- newest-wins per (client, key) by the one rule of engine/serve/newest_wins.py: a new job for a
  key drops that client's waiting job for it and flags its running one, whose cancel Event the
  engine checks between denoising steps;
- the running jobs, at most `max_in_flight` at once, each on its own runner thread (or, where
  `inline_single` says so and one runs at a time, on the owning thread itself). A runner
  that finished its job waits for the next one and takes it from the queue itself: a job
  submitted while a runner idles starts after one thread wake-up, not two and a thread start
  (issue 23's server overhead);
- a pending (re)load, done on the owning thread once no runner runs: the model is never freed
  or replaced under a runner.
A job's deadline (its request's timeout_ms from submission, where the user sets `deadline`) is
checked while it waits: one still queued at its deadline is answered with an empty timed-out
result. Public methods are safe from any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Any

from engine.api import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    Draft,
    EngineInfo,
    EngineInputError,
    EngineLike,
    one_line,
)
from engine.serve.exact_cache import ExactCache, request_key
from engine.serve.newest_wins import NewestWins
from engine.serve.stats import ServiceStats

log = logging.getLogger(__name__)

Reply = Callable[[CompletionResult | None, "str | None"], None]
_order = itertools.count()


@dataclass(eq=False)
class Job:
    """One completion asked of the host (a request queued at the host: only hosts have jobs;
    the engine below hands the worker a DenoiseJob as a Submission, docs/ARCHITECTURE.md);
    answered exactly once: its future gets the result (None when dropped or failed) and its
    `reply`, if any, gets (result, error)."""

    request: CompletionRequest
    key: str = ""  # the document: newest wins per (client, key); "" competes with nothing
    client: int = 0  # whose turn (the shared engine: one per connection)
    id: int = 0  # the client's id for it (Cancel names it)
    reply: Reply | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[CompletionResult | None] = field(default_factory=Future)
    answered: bool = False
    in_model: bool = False  # past the last check that drops it: a cancel now stops a run
    deadline: float | None = None  # time.monotonic() when it is due, if it has a deadline
    attempt: int = 0  # tries so far (the in-process worker retries a failed run)
    # Partial fills while the model runs it (Engine.complete's on_draft).
    on_draft: Callable[[Draft], None] | None = None
    order: int = field(default_factory=lambda: next(_order))  # submission order

    def left_ms(self) -> float | None:
        if self.deadline is None:
            return None
        return (self.deadline - time.monotonic()) * 1000.0

    def answer(self, result: CompletionResult | None, error: str | None = None) -> None:
        if self.answered:
            return
        self.answered = True
        with contextlib.suppress(InvalidStateError):  # its waiter gave up (asyncio cancelled)
            if not self.future.done():
                self.future.set_result(result)
        if self.reply is not None:
            try:
                self.reply(result, error)
            except Exception:  # a broken reply path (closed connection) must not stop a thread
                log.exception("replying to job %s failed", self.id)


class EngineHost:
    """The owning thread, the queues and the runners; subclasses give the policy through
    `_load_task` (on the owning thread), `_serve_job` (on a runner) and the `_on_*` hooks."""

    inline_single = False  # one job at a time runs on the owning thread itself
    one_run_per_key = False  # a key's new job waits until its flagged older run has stopped

    def __init__(self, *, name: str, max_in_flight: int = 1):
        self.state = "unloaded"
        self.error: str | None = None
        self.info: EngineInfo | None = None
        self.max_in_flight = max(1, max_in_flight)
        self._engine: EngineLike | None = None
        self._lock = threading.Condition()  # reentrant: hooks may take it again
        self._queues: OrderedDict[int, deque[Job]] = OrderedDict()
        self._front: deque[Job] = deque()  # run before any queue (a retry after a reload)
        self._running: list[Job] = []  # on a runner now; a flagged one may still be stopping
        self._newest: NewestWins[Job] = NewestWins(self._superseded)
        self._pending_load: Any = None  # what `_load_task` gets, once no runner runs
        self._closing = False
        self._in_loader = False
        self._loading = False  # the owning thread frees and loads: no job starts meanwhile
        self._runners = 0  # runner threads alive
        self._idle_runners = 0  # of which waiting for a job
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                self._refuse_closing(job)
                return
            if job.key:
                self._newest.begin((job.client, job.key), job)
            self._queues.setdefault(job.client, deque()).append(job)
            limit = self._max_waiting()
            while limit is not None and self._waiting() > limit:
                self._drop(self._oldest_waiting())
            self._lock.notify_all()

    def request_load(self, task: Any, *, drop_waiting: bool) -> None:
        """Load `task` on the owning thread once the runners have returned; with
        `drop_waiting`, the waiting jobs are dropped and the running ones flagged (they were
        for the old model)."""
        with self._lock:
            self._pending_load = task
            if drop_waiting:
                self._drop_waiting()
                for job in self._running:
                    job.cancel.set()
            self._lock.notify_all()

    def run_first(self, job: Job) -> None:
        """Queue `job` ahead of every other (a retry once a pending reload is done)."""
        with self._lock:
            self._front.append(job)
            self._lock.notify_all()

    def cancel(self, client: int, job_id: int) -> None:
        with self._lock:
            queue = self._queues.get(client, ())
            for job in [j for j in queue if j.id == job_id]:
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

    @property
    def jobs_in_flight(self) -> int:
        """Jobs on a runner now (flagged ones still stopping included)."""
        with self._lock:
            return len(self._running)

    @property
    def idle_runners(self) -> int:
        """Runner threads waiting for a job: the next job submitted starts on one of them."""
        with self._lock:
            return self._idle_runners

    @property
    def prewarms_encoded(self) -> int | None:
        """Contexts the engine encoded ahead of a request (None: an engine that cannot)."""
        return getattr(self._engine, "prewarms", None)

    def queue_depth(self) -> int:
        with self._lock:
            return self._waiting() + len(self._running)

    def prewarm(self, request: CompletionRequest) -> bool:
        """Hand `request`'s context to the engine to encode when it is idle (Engine.prewarm:
        no denoising, no answer), so a client's next request sharing its start is warm (a new
        extra-context block, issue 23). False when there is no ready engine or it cannot
        pre-warm (another process's); never raises."""
        with self._lock:
            engine = self._engine if self.state == "ready" else None
        prewarm = getattr(engine, "prewarm", None)
        if prewarm is None:
            return False
        try:
            done = bool(prewarm(request))
        except Exception as exc:  # an optimisation: it must never cost anything else
            log.warning("a pre-warm failed: %s", one_line(exc))
            return False
        if done:
            self._on_prewarm()
        return done

    def close(self, timeout: float = 10.0) -> None:
        """Drop the waiting jobs, flag the running ones, and let the owning thread free the
        engine once they returned, waiting at most `timeout` seconds for it (0: do not wait;
        a load in progress is never waited for)."""
        with self._lock:
            self._closing = True
            self._drop_waiting()
            for job in self._running:
                job.cancel.set()
            self._lock.notify_all()
        if timeout > 0 and not self._in_loader and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- policy hooks ----------------------------------------------------------------------

    def _load_task(self, task: Any) -> None:
        """Load what `request_load` asked for (owning thread; the old engine is freed)."""
        raise NotImplementedError

    def _serve_job(self, job: Job) -> tuple[CompletionResult | None, str | None] | None:
        """Run one job on the engine (a runner thread): its answer, or None when the job was
        answered (or queued again) already."""
        raise NotImplementedError

    def _on_drop(self, job: Job) -> None:
        """A job dropped before its answer (superseded, cancelled, its client gone)."""

    def _on_expire(self, job: Job) -> None:
        """A job whose deadline passed while it waited."""

    def _on_prewarm(self) -> None:
        """A context was handed to the engine to encode when idle."""

    def _max_waiting(self) -> int | None:
        """Waiting jobs kept at most (the oldest beyond are dropped); None: no bound."""
        return None

    def _can_run(self) -> bool:
        """Whether waiting jobs may go to a runner now (lock held): by default once an engine
        is loaded; until then they wait (their deadlines still checked)."""
        return self._engine is not None

    def _refuse_closing(self, job: Job) -> None:
        self._drop(job)

    def _after_close(self) -> None:
        self.state = "closed"

    # -- helpers (lock held) ---------------------------------------------------------------

    def _superseded(self, older: Job) -> None:
        """A newer job for its (client, key) came: dropped while it waits, else flagged (one
        waiting to run first is dropped at its turn)."""
        queue = self._queues.get(older.client, ())
        if older in queue:
            queue.remove(older)
            self._drop(older)
        else:
            older.cancel.set()

    def _drop(self, job: Job) -> None:
        job.cancel.set()
        if not job.answered:
            self._on_drop(job)
        self._end(job)
        job.answer(None, None)

    def _end(self, job: Job) -> None:
        if job.key:
            with self._lock:
                self._newest.end((job.client, job.key), job)

    def _drop_waiting(self) -> None:
        for queue in self._queues.values():
            for job in queue:
                self._drop(job)
        self._queues.clear()
        for job in self._front:
            self._drop(job)
        self._front.clear()

    def _waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _oldest_waiting(self) -> Job:
        oldest = min((q[0] for q in self._queues.values() if q), key=lambda j: j.order)
        self._queues[oldest.client].popleft()
        return oldest

    def _expire(self) -> float | None:
        """Answer waiting jobs past their deadline; seconds to the next deadline."""
        now, soonest = time.monotonic(), None
        for queue in self._queues.values():
            for job in [j for j in queue if j.deadline is not None]:
                if job.deadline <= now:
                    queue.remove(job)
                    job.cancel.set()
                    self._on_expire(job)
                    self._end(job)
                    job.answer(timed_out_result(), None)
                elif soonest is None or job.deadline - now < soonest:
                    soonest = job.deadline - now
        return soonest

    def _take(self) -> Job | None:
        """The next job to start: one queued first, else round-robin over the clients, each
        client's oldest job (with `one_run_per_key`, whose key has no run still stopping)."""
        if self._front:
            return self._front.popleft()
        stopping = ({(j.client, j.key) for j in self._running} if self.one_run_per_key
                    else set())
        for client, queue in self._queues.items():
            job = next((j for j in queue if not j.key or (j.client, j.key) not in stopping),
                       None)
            if job is None:
                continue
            queue.remove(job)
            self._queues.move_to_end(client)  # the others go first next time
            if not queue:
                del self._queues[client]
            return job
        return None

    def _next_task(self) -> tuple[str, Any] | None:
        with self._lock:
            while True:
                if self._closing:
                    return None
                if self._pending_load is not None:
                    if not self._running:  # never free or replace the model under a runner
                        task, self._pending_load = self._pending_load, None
                        self._loading = True
                        return "load", task
                elif not self._idle_runners and (job := self._start_next()) is not None:
                    return "job", job  # (an idle runner takes it itself)
                self._lock.wait(self._expire())

    def _start_next(self) -> Job | None:
        """The next job, now counted as running, if one may start now (lock held)."""
        if (self._pending_load is None and not self._loading and self._can_run()
                and len(self._running) < self.max_in_flight
                and (job := self._take()) is not None):
            self._running.append(job)
            self._on_start(len(self._running))
            return job
        return None

    def _inline(self) -> bool:
        return self.inline_single and self.max_in_flight == 1

    def _on_start(self, in_flight: int) -> None:
        """A job left the queue for a runner; `in_flight` run now (lock held)."""

    # -- the owning thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (task := self._next_task()) is not None:
                kind, what = task
                if kind == "load":
                    self._free()
                    self._in_loader = True
                    try:
                        self._load_task(what)
                    except Exception:  # a bug in a load must not take the owning thread down
                        log.exception("engine host load failed")
                    finally:
                        self._in_loader = False
                        with self._lock:  # idle runners may take the waiting jobs now
                            self._loading = False
                            self._lock.notify_all()
                elif self._inline():
                    self._serve(what)
                else:
                    with self._lock:
                        self._runners += 1
                    # (in a list the thread empties: its args must not keep the job alive)
                    runner = threading.Thread(target=self._runner, args=([what],),
                                              name="maskfill-job", daemon=True)
                    try:
                        runner.start()
                    except RuntimeError:  # no thread to be had: this one serves the job
                        log.exception("engine host could not start a runner")
                        with self._lock:
                            self._runners -= 1
                        self._serve(what)
        finally:
            with self._lock:  # close() flagged them: each returns within a denoising step
                while self._running:
                    self._lock.wait()
            self._free()
            self._after_close()

    # -- a runner thread --------------------------------------------------------------------

    def _runner(self, first: list[Job]) -> None:
        """Serve the job in `first`, then the jobs this runner takes from the queue while it
        is needed."""
        counted = True  # in `_runners`: this thread must take itself out however it ends
        try:
            job: Job | None = first.pop()
            while job is not None:
                self._serve(job)
                job = None  # not kept alive while the runner idles
                job = self._next_for_runner()
            counted = False  # (`_next_for_runner` took it out, in the same turn of the lock)
        finally:
            if counted:  # a BaseException: a count left high would make later runners quit
                with self._lock:
                    self._runners -= 1
                    self._lock.notify_all()

    def _next_for_runner(self) -> Job | None:
        """The next job for an idle runner; None (the thread ends, no longer counted in
        `_runners`) once the host closes, or runs its jobs on the owning thread, or has more
        runners than jobs may run at once."""
        with self._lock:
            self._idle_runners += 1
            try:
                while not (self._closing or self._inline()
                           or self._runners > self.max_in_flight):
                    if (job := self._start_next()) is not None:
                        if self._front or self._waiting():  # the next may start too
                            self._lock.notify_all()
                        return job
                    self._lock.wait()
                self._runners -= 1
                self._lock.notify_all()  # the owning thread starts the jobs no runner waits for
                return None
            finally:
                self._idle_runners -= 1

    def _serve(self, job: Job) -> None:
        outcome: tuple[CompletionResult | None, str | None] | None = (None, "internal error")
        try:
            outcome = self._serve_job(job)
        except Exception:  # a bug in one job must not take its thread (or the host) down
            log.exception("engine host job failed")
        finally:
            with self._lock:
                self._running.remove(job)  # before answering: status must not lag it
                if outcome is not None:
                    self._end(job)
                self._lock.notify_all()
            if outcome is not None:
                job.answer(*outcome)

    def _free(self) -> None:
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception:  # freeing must never raise into shutdown
                log.exception("engine.close() failed")
            self._engine = None
            log.info("model freed")


class ServiceHost(EngineHost):
    """The shared engine process's host (engine/serve/server.py, the HTTP API, a cluster
    replica): loads one model, serves every client in turn; deterministic requests answered
    from the exact cache (engine/serve/exact_cache.py); a request's deadline counts from its
    submission, its wait included, and one that starts late gets only what is left of its
    time. Requests the engine refuses as malformed (EngineInputError: the client's mistake)
    count as "rejected", not as engine errors."""

    def __init__(
        self, load: Callable[[], EngineLike], stats: ServiceStats | None = None,
        cache_size: int = 256, max_in_flight: int = 1,
    ):
        super().__init__(name="maskfill-model", max_in_flight=max_in_flight)
        self.stats = stats or ServiceStats()
        self.cache: ExactCache[CompletionResult] = ExactCache(cache_size)
        self.state = "loading"  # loading | ready | failed | closed
        self._ready = threading.Event()  # set once the load succeeded or failed
        self.request_load(load, drop_waiting=False)
        self.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def submit(self, job: Job) -> None:
        if job.request.timeout_ms is not None:
            job.deadline = time.monotonic() + job.request.timeout_ms / 1000.0
        if self.state == "failed":
            job.answer(None, f"the model did not load: {self.error}")
            return
        cache_key = request_key(job.request)
        if cache_key is not None and (hit := self.cache.get(cache_key)) is not None:
            self.stats.record_cache(True)
            self.stats.record_outcome("cached")  # a request like any other in /metrics
            if job.key:  # it still supersedes that key's older job
                with self._lock:
                    self._newest.begin((job.client, job.key), job)
                    self._end(job)
            job.answer(hit, None)
            return
        super().submit(job)

    def _on_prewarm(self) -> None:
        self.stats.record_prewarm()

    def _refuse_closing(self, job: Job) -> None:
        job.answer(None, "the engine is shutting down")

    def _on_drop(self, job: Job) -> None:
        self.stats.record_outcome("dropped")

    def _on_expire(self, job: Job) -> None:
        self.stats.record_outcome("timed_out")

    def _after_close(self) -> None:
        self.state = "closed" if self.state != "failed" else "failed"
        self._ready.set()

    def _load_task(self, load: Callable[[], EngineLike]) -> None:
        try:
            engine = load()
            self.info = engine.info()
            self._engine = engine
            self.stats.model_loads += 1
            self.state = "ready"
        except Exception as exc:  # a bad checkpoint or OOM: report it to every client
            self.error = one_line(exc)
            self.state = "failed"
            log.error("loading the model failed: %s", self.error)
        finally:
            self._ready.set()

    def _serve_job(self, job: Job) -> tuple[CompletionResult | None, str | None]:
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
            return None, one_line(exc)
        except Exception as exc:  # one bad request must not take the model thread down
            self.stats.record_outcome("error")
            log.warning("completion failed: %s", exc)
            return None, one_line(exc)
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

