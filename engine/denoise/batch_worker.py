"""The thread that owns the model: concurrent requests share each denoising pass.

`Engine.complete` keeps its blocking API: it hands a DenoiseJob (one request's denoising) to
`BatchWorker.run` and waits on its Submission. The worker thread admits waiting submissions
between passes, first come first served, while the rows in flight stay within a row budget,
then runs one pass for every request in flight (engine/denoise/loop.py, the one driver:
`DenoiseLoop.turn`): each advances one step per pass, so a long request cannot hold back a short
one, and each leaves as soon as it is done, cancelled or past its deadline.

No request holds the whole batch: one with more rows than `max_job_rows` runs as chunks of at
most that many, one after another, each queued behind whatever came meanwhile
(engine/denoise/job_chunks.py), so there is always room for others beside it (the engine picks the
share: engine/engine.py, MAX_JOB_ROWS_CPU). A waiting
request that does not fit yet is passed over by smaller ones behind it, at most MAX_OVERTAKES times
(then it waits first in line). A waiting request whose caller gave up or whose deadline passed is
answered at once, unrun. A cancel reaches the model within one layer: the context encode and
every pass check it between layers (loop.stop_gates), as the background work below does.

Work that is not a shared-loop request runs only when nothing is in flight or waiting:
`exclusive` work (DreamOn's own loop, a CUDA graph capture) and the low-priority `when_idle`
tasks (engine/engine.py: the re-encode of a worn reuse chain, engine/denoise/context_refresh.py,
then the speculative next context), one per idle turn, all dropped when a request arrives
first. A started speculation grown from the last context runs to its end (one step-sized
pass); a started refresh, prewarm or speculation encoded in full stops between two layers of
its encode when a request arrives (model.ENCODE_GATE), so a request waits one layer at most.
Idle tasks also wait IDLE_GRACE_S of idleness first: a caller that sends requests back to
back (a script, an eval) would otherwise find each one queued behind a speculation (measured:
+18 ms a request on the embedded model), while an editor's next request comes a debounce
(>= 75 ms) after a keystroke, time enough for the grace and the pass.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from engine.denoise.job_chunks import merge, split_job
from engine.denoise.loop import Denoised, DenoiseJob, DenoiseLoop
from engine.model.transformer import ENCODE_GATE, EncodeInterrupted

log = logging.getLogger(__name__)
IDLE_GRACE_S = 0.025
# How often smaller requests may be admitted past a waiting one that does not fit yet: enough to
# keep short requests moving beside a big one, few enough that the big one's wait is bounded.
MAX_OVERTAKES = 8
# Workers still running at interpreter exit are stopped first: a daemon thread frozen inside
# torch at shutdown aborts the process ("terminate called without an active exception").
_RUNNING: weakref.WeakSet[BatchWorker] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for worker in list(_RUNNING):
        worker.close(timeout=5.0)


class WorkerClosed(RuntimeError):
    """The worker stopped (the engine was closed) before this submission could finish."""


@dataclass(eq=False)
class Submission:
    """What a caller handed the worker (`_submit`), blocked until it is answered: a request's
    denoise job for the shared loop, or exclusive work. It waits in the worker's line, is
    admitted (in flight: the loop's RequestState), and is answered once. Not to be confused
    with a host's Job (engine/serve/host.py): a request queued at the host, one level up,
    whose runner thread calls Engine.complete, which makes the submission."""

    job: DenoiseJob | None  # a request for the shared loop
    exclusive: Callable[[], object] | None = None  # or work that needs the model alone
    rows: int = 0
    overtaken: int = 0  # submissions admitted ahead of it while it did not fit
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None

    def answer(self, result: object = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class BatchWorker:
    def __init__(self, loop: DenoiseLoop, row_budget: int, name: str = "maskfill-denoise",
                 max_job_rows: int | None = None):
        self.loop = loop
        self.row_budget = row_budget
        self.max_job_rows = max_job_rows or max(1, row_budget - row_budget // 4)
        self._cond = threading.Condition()
        self._waiting: deque[Submission] = deque()
        # Pending idle tasks by key, in the order they run (dicts keep insertion order).
        self._idle_tasks: dict[Hashable, Callable[[], None]] = {}
        self._closing = False
        self._name = name
        self._thread: threading.Thread | None = None
        self._busy = False  # the model thread is doing something (under _cond)
        self._idle_since = 0.0  # when the last request left (time.monotonic())
        self.passes = 0  # shared passes run
        self.peak_rows = 0  # most rows in one pass
        self.interrupted = 0  # idle tasks stopped mid-encode by a request

    # ---- any thread

    def run(self, job: DenoiseJob) -> Denoised | None:
        """Denoise `job` with whatever else is in flight; None when it never reached the
        model (cancelled, or its deadline passed while it waited: `job.stop` says which).
        A job with more rows than max_job_rows runs in chunks, one after another."""
        chunks = split_job(job, self.max_job_rows) if job.generator is None else [job]
        if len(chunks) == 1:
            return self._submit(Submission(job=job, rows=job.rows))
        parts: list[Denoised] = []
        for chunk in chunks:
            done = self._submit(Submission(job=chunk, rows=chunk.rows))
            if done is None:  # given up while it waited: what ran so far is the answer
                break
            parts.append(done)
            if done.cancelled or done.timed_out:
                break
        if not parts:
            return None
        out = merge(job, parts, self.loop.args.mask_token_id)
        if len(parts) < len(chunks):
            out.cancelled = job.stop.cancelled()
            out.timed_out = not out.cancelled
        return out

    def run_exclusive(self, work: Callable[[], object]) -> object:
        """Run `work` on the model thread with nothing else in flight."""
        return self._submit(Submission(job=None, exclusive=work))

    def when_idle(self, task: Callable[[], None] | None, key: Hashable = "idle",
                  first: bool = False) -> None:
        """Run `task` once the worker has nothing else to do. It replaces the pending task of
        the same `key` (None just removes that one) and runs after the other pending tasks, or
        before them when `first`. A request that arrives first drops them all."""
        with self._cond:
            self._idle_tasks.pop(key, None)
            if task is not None:
                rest = self._idle_tasks
                self._idle_tasks = {key: task, **rest} if first else {**rest, key: task}
            self._ensure_thread()
            self._cond.notify()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is waiting, in flight or pending at idle (speculation done)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._waiting or self.loop.active or self._idle_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _submit(self, submission: Submission) -> object:
        with self._cond:
            if self._closing:
                raise WorkerClosed("the engine is closed")
            self._idle_tasks = {}  # a request arrived: what was prepared for later is moot
            self._waiting.append(submission)
            self._ensure_thread()
            self._cond.notify()
        submission.done.wait()
        if submission.error is not None:
            raise submission.error
        return submission.result

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
            _RUNNING.add(self)

    # ---- the model thread

    def _main(self) -> None:
        try:
            with torch.inference_mode():
                while self._turn():
                    pass
        finally:
            with self._cond:
                waiting, self._waiting = list(self._waiting), deque()
            for submission in waiting:
                submission.answer(error=WorkerClosed("the engine is closed"))
            for state in self.loop.abort():
                state.answer(error=WorkerClosed("the engine is closed"))

    def _turn(self) -> bool:
        """One round: admit, then a pass (or exclusive work, or the idle task). False: stop."""
        admitted, exclusive, idle = self._admit()
        if admitted is None:
            return False
        newcomers = [(submission.job, submission.answer) for submission in admitted]
        if exclusive is not None:  # (nothing admitted, nothing in flight: it waited for that)
            try:
                exclusive.answer(exclusive.exclusive())
            except Exception as error:  # noqa: BLE001
                exclusive.answer(error=error)
            self._idle_since = time.monotonic()
        elif newcomers or self.loop.active:
            rows = self.loop.turn(newcomers)
            if rows:
                self.passes += 1
                self.peak_rows = max(self.peak_rows, rows)
            if not self.loop.active:
                self._idle_since = time.monotonic()
        elif idle is not None:
            self._run_idle(idle)
        return True

    def _run_idle(self, task: Callable[[], None]) -> None:
        """Run an idle task; an encode inside it stops between layers once a request waits."""
        token = ENCODE_GATE.set(self._gate)
        try:
            task()
        except EncodeInterrupted:
            self.interrupted += 1  # the request re-encodes what it needs; nothing is lost
        except Exception:  # noqa: BLE001 - work for later must never hurt a request
            log.exception("idle task failed")
        finally:
            ENCODE_GATE.reset(token)

    def _gate(self, hidden: torch.Tensor) -> None:
        if hidden.is_cuda:  # the host runs ahead of the device: check where the device is
            torch.cuda.current_stream(hidden.device).synchronize()
        if self._waiting or self._closing:
            raise EncodeInterrupted

    def _admit(self) -> tuple[list[Submission] | None, Submission | None,
                              Callable[[], None] | None]:
        """Requests to start now (FIFO within the row budget), exclusive work that may run now,
        the idle task when there is nothing else; (None, ...) when closing."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            while True:
                if self._closing:
                    return None, None, None
                self._drop_cancelled()
                if self._waiting or self.loop.active:
                    break
                if self._idle_tasks:
                    grace = self._idle_since + IDLE_GRACE_S - time.monotonic()
                    if grace <= 0:
                        break
                    self._cond.wait(grace)
                    continue
                self._cond.wait()
            self._busy = True
            admitted: list[Submission] = []
            rows = self.loop.rows
            passed: list[Submission] = []  # waiting requests that did not fit this time
            for submission in list(self._waiting):
                if submission.exclusive is not None:
                    if passed or self.loop.active or admitted:
                        break  # it waits for the batch to drain; nobody overtakes it
                    self._waiting.remove(submission)
                    return admitted, submission, None
                if rows and rows + submission.rows > self.row_budget:
                    passed.append(submission)
                    if submission.overtaken >= MAX_OVERTAKES:
                        break  # its turn: nobody else goes first until it fits
                    continue
                self._waiting.remove(submission)
                admitted.append(submission)
                rows += submission.rows
                for waiting in passed:
                    waiting.overtaken += 1
                if rows >= self.row_budget:
                    break
            idle = None
            if not admitted and not self.loop.active and not self._waiting and self._idle_tasks:
                idle = self._idle_tasks.pop(next(iter(self._idle_tasks)))
            return admitted, None, idle

    def _drop_cancelled(self) -> None:
        """Answer waiting requests whose caller gave up or whose deadline passed before they
        reached the model (the caller reads which from its StopSignal)."""
        for submission in [s for s in self._waiting if s.job is not None and
                           (s.job.stop.cancelled() or s.job.stop.expired())]:
            self._waiting.remove(submission)
            submission.answer(None)
