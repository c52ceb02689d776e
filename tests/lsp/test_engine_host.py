"""The engine worker's scheduling: newest wins per document, drops, retries, fallback, freeing.

SchedulingProbe stands in for the engine only to observe *which* jobs reach it and *when*; it
returns empty results and no text, so nothing here checks completion output.
"""

import threading
import time

import pytest

from engine.api import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    EngineError,
    EngineInfo,
    EngineInputError,
)
from lsp_server.engine_host import (
    FALLBACK_AFTER_FAILURES,
    MAX_IN_FLIGHT,
    MAX_PENDING_JOBS,
    LoadSpec,
    LspEngineHost,
)
from tests.waiting import wait_until

OUT_OF_MEMORY = EngineError("out of memory (probe)")


class SchedulingProbe:
    def __init__(self, device="cpu", fail_first=0, failure=OUT_OF_MEMORY):
        self.device = device
        self.failure = failure
        self.started = threading.Event()
        self.release = threading.Event()
        self.seen: list[CompletionRequest] = []
        self.fail_first = fail_first
        self.closed = False

    def complete(self, request, cancel=None):
        self.seen.append(request)
        if self.fail_first:
            self.fail_first -= 1
            raise self.failure
        self.started.set()
        while not self.release.is_set() and not (cancel and cancel.is_set()):
            time.sleep(0.002)  # like the denoiser: look at the flag between steps
        cancelled = bool(cancel and cancel.is_set())
        return CompletionResult(text="", candidates=[], stats=CompletionStats(cancelled=cancelled))

    def info(self):
        return EngineInfo(
            model="probe",
            path="probe",
            family="dream",
            device=self.device,
            dtype="float32",
            quant="none",
            weight_bytes=0,
            parameters=0,
            max_context=256,
            load_ms=0.0,
        )

    def close(self):
        self.closed = True


def request(tag: str, max_tokens: int = 32) -> CompletionRequest:
    return CompletionRequest(prefix=tag, suffix="", max_tokens=max_tokens)


@pytest.fixture
def probe_worker():
    probes = []
    events = []

    def loader(spec):
        probe = SchedulingProbe(spec.device)
        probes.append(probe)
        return probe

    worker = LspEngineHost(loader, on_event=lambda kind, payload: events.append((kind, payload)))
    worker.load(LoadSpec(model="probe"))
    wait_until(lambda: worker.ready)
    yield worker, probes, events
    worker.close()


def test_newest_wins_per_document(probe_worker):
    worker, probes, _ = probe_worker
    probe = probes[0]
    first = worker.submit("u", request("1"))
    assert probe.started.wait(5)
    queued = [worker.submit("u", request(str(i))) for i in range(2, 6)]
    assert first.cancel.is_set()  # the running one is told to stop between steps
    for job in queued[:-1]:  # superseded before reaching the model
        assert job.future.result(5) is None
    probe.release.set()
    assert first.future.result(5).stats.cancelled
    queued[-1].future.result(5)
    assert [r.prefix for r in probe.seen] == ["1", "5"]
    assert worker.stats.model_runs == 2
    assert worker.stats.dropped == 3


def test_documents_do_not_supersede_each_other(probe_worker):
    worker, probes, _ = probe_worker
    probes[0].release.set()
    a = worker.submit("a", request("a"))
    b = worker.submit("b", request("b"))
    assert a.future.result(5) is not None and b.future.result(5) is not None
    assert sorted(r.prefix for r in probes[0].seen) == ["a", "b"]


def test_a_flagged_job_never_reaches_the_model(probe_worker):
    worker, probes, _ = probe_worker
    busy = worker.submit("busy", request("busy"))
    assert probes[0].started.wait(5)
    waiting = worker.submit("u", request("flagged"))
    waiting.cancel.set()  # e.g. $/cancelRequest while queued
    probes[0].release.set()
    busy.future.result(5)
    assert waiting.future.result(5) is None
    assert [r.prefix for r in probes[0].seen] == ["busy"]


def test_engine_failure_retries_with_a_smaller_span(probe_worker):
    worker, probes, events = probe_worker
    probes[0].fail_first = 1
    probes[0].release.set()
    job = worker.submit("u", request("x", max_tokens=32))
    assert job.future.result(5) is not None
    assert [r.max_tokens for r in probes[0].seen] == [32, 16]
    assert any(kind == "engine-error" for kind, _ in events)
    assert worker.state == "ready"


def failing_on_cuda_worker(failures: int):
    probes = []

    def loader(spec):
        probe = SchedulingProbe(spec.device, fail_first=failures if spec.device == "cuda" else 0)
        probe.release.set()
        probes.append(probe)
        return probe

    worker = LspEngineHost(loader)
    worker.load(LoadSpec(model="probe", device="cuda", fallback_device="cpu"))
    wait_until(lambda: worker.ready)
    return worker, probes


def test_a_transient_failure_does_not_move_the_model():
    worker, probes = failing_on_cuda_worker(failures=2)
    assert worker.submit("u", request("x")).future.result(5) is None  # both tries failed
    assert worker.submit("u", request("y")).future.result(5) is not None  # cuda works again
    assert [p.device for p in probes] == ["cuda"] and worker.device == "cuda"
    worker.close()


def test_repeated_failure_moves_to_the_fallback_device():
    worker, probes = failing_on_cuda_worker(failures=FALLBACK_AFTER_FAILURES + 1)
    assert worker.submit("u", request("x")).future.result(5) is None  # failures 1 and 2
    job = worker.submit("u", request("x"))  # failures 3 and 4: repeated, so move and retry
    assert job.future.result(5) is not None
    assert [p.device for p in probes] == ["cuda", "cpu"]
    assert probes[0].closed  # the failing engine was freed before the reload
    assert worker.device == "cpu"
    worker.close()


def test_load_failure_falls_back_then_reports():
    events = []

    def loader(spec):
        if spec.device == "cuda":
            raise RuntimeError("CUDA out of memory")
        return SchedulingProbe(spec.device)

    worker = LspEngineHost(loader, on_event=lambda kind, payload: events.append((kind, payload)))
    worker.load(LoadSpec(model="m", device="cuda", fallback_device="cpu"))
    wait_until(lambda: worker.ready)
    assert worker.device == "cpu"
    assert events[-1][0] == "load-end" and events[-1][1]["fellBack"]

    def broken(spec):
        raise EngineError("config.json is missing")

    failing = LspEngineHost(broken, on_event=lambda kind, payload: events.append((kind, payload)))
    failing.load(LoadSpec(model="m"))
    wait_until(lambda: failing.state == "failed")
    assert "config.json is missing" in failing.error
    assert events[-1][0] == "load-failed"
    job = failing.submit("u", request("x"))  # no model: dropped, not crashed
    assert job.future.result(5) is None
    worker.close()
    failing.close()


def test_close_frees_the_model_and_drops_pending_jobs(probe_worker):
    worker, probes, _ = probe_worker
    busy = worker.submit("a", request("a"))
    assert probes[0].started.wait(5)
    pending = worker.submit("b", request("b"))
    worker.close()
    assert pending.future.result(5) is None
    assert busy.future.result(5).stats.cancelled
    assert probes[0].closed and worker.state == "closed"
    assert worker.submit("c", request("c")).future.result(5) is None


def test_reload_drops_jobs_for_the_old_model(probe_worker):
    worker, probes, _ = probe_worker
    busy = worker.submit("a", request("a"))
    assert probes[0].started.wait(5)
    pending = worker.submit("b", request("b"))
    worker.load(LoadSpec(model="probe", device="cpu"))
    assert pending.future.result(5) is None
    busy.future.result(5)
    wait_until(lambda: worker.ready and len(probes) == 2)
    assert probes[0].closed


def test_a_waiter_giving_up_does_not_break_the_worker(probe_worker):
    worker, probes, _ = probe_worker
    job = worker.submit("u", request("a"))
    assert probes[0].started.wait(5)
    job.future.cancel()  # what asyncio.wrap_future does when the request task is cancelled
    probes[0].release.set()
    later = worker.submit("v", request("b"))
    assert later.future.result(5) is not None
    assert worker.state == "ready"


def test_no_model_configured_fails_once_with_a_clear_message(monkeypatch):
    import lsp_server.engine_host as worker_module

    monkeypatch.setattr(worker_module, "default_model_path", lambda: None)
    events = []
    worker = LspEngineHost(
        worker_module.load_engine, on_event=lambda kind, payload: events.append(kind)
    )
    worker.load(LoadSpec(model=None, device="cuda", fallback_device="cpu"))
    wait_until(lambda: worker.state == "failed")
    assert worker.error.startswith("no model configured")
    assert events.count("load-begin") == 1  # another device would not help
    worker.close()


def test_bad_input_is_refused_alone_and_never_moves_the_model():
    probes = []

    def loader(spec):
        probe = SchedulingProbe(
            spec.device, fail_first=100, failure=EngineInputError("prefix cannot be tokenized")
        )
        probes.append(probe)
        return probe

    worker = LspEngineHost(loader)
    worker.load(LoadSpec(model="probe", device="cuda", fallback_device="cpu"))
    wait_until(lambda: worker.ready)
    for _ in range(FALLBACK_AFTER_FAILURES + 2):
        assert worker.submit("u", request("\ud800")).future.result(5) is None
    assert len(probes[0].seen) == FALLBACK_AFTER_FAILURES + 2  # no retry at half the span
    assert worker.stats.failures == 0 and worker.device == "cuda" and len(probes) == 1
    worker.close()


def test_the_queue_keeps_only_the_newest_jobs_across_documents(probe_worker):
    worker, probes, _ = probe_worker
    busy = worker.submit("busy", request("busy"))
    assert probes[0].started.wait(5)
    queued = [worker.submit(f"doc{i}", request(f"doc{i}")) for i in range(10)]
    dropped = queued[: -MAX_PENDING_JOBS]
    assert all(job.future.result(5) is None for job in dropped)  # oldest first
    probes[0].release.set()
    busy.future.result(5)
    for job in queued[-MAX_PENDING_JOBS:]:
        assert job.future.result(5) is not None
    assert [r.prefix for r in probes[0].seen] == ["busy", "doc8", "doc9"]


def test_close_does_not_wait_for_a_load_in_progress():
    gate = threading.Event()

    def slow_loader(spec):
        gate.wait(10)
        return SchedulingProbe(spec.device)

    worker = LspEngineHost(slow_loader)
    worker.load(LoadSpec(model="probe"))
    wait_until(lambda: worker._in_loader)
    worker.close(timeout=30)
    assert worker._in_loader and not gate.is_set()  # returned while the load still runs
    gate.set()
    wait_until(lambda: worker.state == "closed")  # the thread frees what it loaded


# -- several jobs at once (an engine with concurrent_calls) ---------------------------------


class OverlapProbe:
    """Stands in for an engine to observe which calls are in flight *together*: each call holds
    until the test releases its tag (the request's prefix) or its cancel Event is set; a
    `stubborn` tag ignores its cancel (a long denoising step) and holds until released."""

    def __init__(self, device="cpu", concurrent=True, failing=(), hold=True):
        self.concurrent_calls = concurrent
        self.device = device
        self.failing = tuple(failing)  # tags that raise OUT_OF_MEMORY
        self.hold = hold
        self.stubborn: set[str] = set()
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], threading.Event] = {}
        self.seen: list[CompletionRequest] = []
        self.threads: list[str] = []
        self.thread_objects: list[threading.Thread] = []  # kept alive: each one distinct
        self.active = 0
        self.most_at_once = 0
        self.closed = False
        self.active_at_close: int | None = None

    def event(self, kind: str, tag: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault((kind, tag), threading.Event())

    def started(self, tag: str, timeout=5.0) -> bool:
        return self.event("started", tag).wait(timeout)

    def release(self, *tags: str) -> None:
        for tag in tags:
            self.event("release", tag).set()

    def complete(self, request, cancel=None):
        tag = request.prefix
        with self._lock:
            self.seen.append(request)
            self.threads.append(threading.current_thread().name)
            self.thread_objects.append(threading.current_thread())
            if tag.startswith(self.failing) and self.failing:
                raise OUT_OF_MEMORY
            self.active += 1
            self.most_at_once = max(self.most_at_once, self.active)
        self.event("started", tag).set()
        release = self.event("release", tag)
        try:
            while self.hold and not release.wait(0.002):
                if cancel is not None and cancel.is_set() and tag not in self.stubborn:
                    break
        finally:
            with self._lock:
                self.active -= 1
        cancelled = bool(cancel and cancel.is_set())
        return CompletionResult(text="", candidates=[], stats=CompletionStats(cancelled=cancelled))

    info = SchedulingProbe.info

    def close(self):
        with self._lock:
            self.closed = True
            self.active_at_close = self.active


def overlap_worker(**probe_options):
    probes: list[OverlapProbe] = []

    def loader(spec):
        probes.append(OverlapProbe(spec.device, **probe_options))
        return probes[-1]

    worker = LspEngineHost(loader)
    worker.load(LoadSpec(model="probe"))
    wait_until(lambda: worker.ready)
    return worker, probes


def test_two_documents_run_at_the_same_time():
    worker, (probe,) = overlap_worker()
    a = worker.submit("a", request("a"))
    b = worker.submit("b", request("b"))
    assert probe.started("a") and probe.started("b")  # b started while a still held
    assert probe.active == 2 and worker.jobs_in_flight == 2
    probe.release("a", "b")
    assert a.future.result(5) is not None and b.future.result(5) is not None
    assert not a.future.result().stats.cancelled and not b.future.result().stats.cancelled
    status = worker.stats.snapshot()
    assert status["modelRuns"] == 2 and status["peakJobsInFlight"] == 2
    assert status["droppedJobs"] == 0 and status["cancelledRuns"] == 0
    assert all(name == "maskfill-job" for name in probe.threads)  # runners, not the worker
    worker.close()


def test_a_runner_that_finished_takes_the_next_job_itself():
    """A job submitted while a runner idles runs on that runner: no thread is started for
    it (a thread start and a second wake-up were ~0.3 ms of each request, issue 23)."""
    worker, (probe,) = overlap_worker()
    for tag in ("a", "b", "c"):
        if tag != "a":  # (the job's answer comes before its runner idles again)
            wait_until(lambda: worker.idle_runners == 1)
        job = worker.submit(tag, request(tag))
        assert probe.started(tag)
        probe.release(tag)
        assert job.future.result(5) is not None
    assert len(set(probe.thread_objects)) == 1
    assert probe.threads == ["maskfill-job"] * 3
    worker.close()


class RunnerKilled(BaseException):
    """Ends a runner thread past `_serve`'s `except Exception` (like a SystemExit would)."""


def test_a_runner_ended_by_a_base_exception_leaves_the_runner_count_right(monkeypatch):
    """A runner thread that dies must not stay counted: a count left too high makes every
    later runner quit after one job (a thread start per job again, unseen)."""
    died: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: died.append(hook.exc_value))
    worker, (probe,) = overlap_worker(hold=False)
    original = probe.complete

    def complete(request, cancel=None):
        if request.prefix.startswith("kill"):
            raise RunnerKilled
        return original(request, cancel)

    probe.complete = complete
    for index in range(MAX_IN_FLIGHT):  # as many dead runners as may run: all, if counted
        job = worker.submit(f"kill{index}", request(f"kill{index}"))
        assert job.future.result(5) is None  # answered all the same ("internal error")
        wait_until(lambda n=index + 1: len(died) == n)
    assert all(isinstance(exc, RunnerKilled) for exc in died)
    for tag in ("a", "b", "c"):
        if tag != "a":
            wait_until(lambda: worker.idle_runners == 1)
        assert worker.submit(tag, request(tag)).future.result(5) is not None
    assert len(set(probe.thread_objects)) == 1  # one runner took them all
    worker.close()


def test_a_job_submitted_during_a_reload_waits_for_the_new_model_with_runners_idle():
    """A job submitted while the new model loads reaches it, not dropped for want of one.
    (LspEngineHost._free sets max_in_flight to 1 first, so the idle runner quits rather than
    take it: test_an_idle_runner_takes_no_job_while_the_owning_thread_frees_the_old_model
    guards the `_loading` rule.)"""
    probes: list[OverlapProbe] = []
    loading = threading.Event()
    finish_load = threading.Event()

    def loader(spec):
        if probes:  # the second load holds until the test has submitted
            loading.set()
            assert finish_load.wait(5)
        probes.append(OverlapProbe(spec.device, hold=False))
        return probes[-1]

    worker = LspEngineHost(loader)
    worker.load(LoadSpec(model="probe"))
    wait_until(lambda: worker.ready)
    assert worker.submit("a", request("a")).future.result(5) is not None  # a runner now idles
    worker.load(LoadSpec(model="probe"))
    assert loading.wait(5)
    job = worker.submit("b", request("b"))
    finish_load.set()
    assert job.future.result(5) is not None
    assert [r.prefix for r in probes[1].seen] == ["b"]
    assert worker.stats.dropped == 0
    worker.close()


def test_a_job_whose_runner_cannot_start_runs_on_the_owning_thread(monkeypatch):
    """No thread to be had (RuntimeError from start): the job still runs, and the host
    still serves the next ones."""
    start = threading.Thread.start

    def refuse_runners(thread):
        if thread.name == "maskfill-job":
            raise RuntimeError("can't start new thread")
        start(thread)

    worker, (probe,) = overlap_worker(hold=False)
    monkeypatch.setattr(threading.Thread, "start", refuse_runners)
    for tag in ("a", "b"):
        job = worker.submit(tag, request(tag))
        assert job.future.result(5) is not None and not job.future.result().stats.cancelled
    assert probe.threads == ["maskfill-engine"] * 2
    worker.close()


class PausingFreeHost(LspEngineHost):
    """Pauses in `_free` (on the owning thread, before the model is freed) once asked."""

    def __init__(self, loader):
        self.pause_next_free = False
        self.freeing = threading.Event()
        self.resume = threading.Event()
        super().__init__(loader)

    def _free(self) -> None:
        if self.pause_next_free and self._engine is not None:
            self.pause_next_free = False
            self.freeing.set()
            assert self.resume.wait(10)
        super()._free()


def test_an_idle_runner_takes_no_job_while_the_owning_thread_frees_the_old_model():
    """No job starts while the owning thread frees and loads (`_loading`): a job submitted
    then, with an idle runner at hand and the old model not yet freed, runs on the new one."""
    probes: list[OverlapProbe] = []

    def loader(spec):
        probes.append(OverlapProbe(spec.device, hold=False))
        return probes[-1]

    worker = PausingFreeHost(loader)
    worker.load(LoadSpec(model="probe"))
    wait_until(lambda: worker.ready)
    assert worker.submit("a", request("a")).future.result(5) is not None
    wait_until(lambda: worker.idle_runners == 1)
    worker.pause_next_free = True
    worker.load(LoadSpec(model="probe"))
    assert worker.freeing.wait(5)
    assert worker.idle_runners == 1 and worker.max_in_flight == MAX_IN_FLIGHT
    job = worker.submit("b", request("b"))
    # (the idle runner would take it at once: a while without it on the old model will do)
    assert not probes[0].started("b", timeout=0.5)
    worker.resume.set()
    assert job.future.result(5) is not None and not job.future.result().stats.cancelled
    assert [r.prefix for r in probes[0].seen] == ["a"]
    assert [r.prefix for r in probes[1].seen] == ["b"]
    assert worker.stats.dropped == 0
    worker.close()


def test_a_document_waits_while_max_in_flight_jobs_run():
    worker, (probe,) = overlap_worker()
    tags = [f"doc{i}" for i in range(MAX_IN_FLIGHT)]
    running = [worker.submit(tag, request(tag)) for tag in tags]
    assert all(probe.started(tag) for tag in tags)
    late = worker.submit("late", request("late"))
    assert "late" not in [r.prefix for r in probe.seen]  # every runner is taken
    probe.release("doc0")
    assert running[0].future.result(5) is not None
    assert probe.started("late")  # took the freed runner
    assert probe.most_at_once == MAX_IN_FLIGHT
    probe.release(*tags, "late")
    assert all(job.future.result(5) is not None for job in [*running, late])
    assert worker.stats.snapshot()["peakJobsInFlight"] == MAX_IN_FLIGHT
    worker.close()


def test_beyond_the_running_jobs_the_queue_keeps_only_the_newest():
    worker, (probe,) = overlap_worker()
    tags = [f"doc{i}" for i in range(MAX_IN_FLIGHT)]
    running = [worker.submit(tag, request(tag)) for tag in tags]
    assert all(probe.started(tag) for tag in tags)
    queued = [worker.submit(f"q{i}", request(f"q{i}")) for i in range(10)]
    assert all(job.future.result(5) is None for job in queued[:-MAX_PENDING_JOBS])
    probe.release(*tags, *(f"q{i}" for i in range(10)))
    assert all(job.future.result(5) is not None for job in running + queued[-MAX_PENDING_JOBS:])
    assert sorted(r.prefix for r in probe.seen) == sorted(tags + ["q8", "q9"])
    worker.close()


def test_newest_wins_stops_only_that_documents_running_job():
    worker, (probe,) = overlap_worker()
    probe.stubborn.add("a1")  # still stopping until released
    a = worker.submit("a", request("a1"))
    b = worker.submit("b", request("b1"))
    assert probe.started("a1") and probe.started("b1")
    newer = worker.submit("a", request("a2"))
    assert a.cancel.is_set() and not b.cancel.is_set()
    assert "a2" not in [r.prefix for r in probe.seen]  # one run per document at a time
    probe.release("a1")
    assert a.future.result(5).stats.cancelled
    assert probe.started("a2")  # runs beside b, which keeps going
    assert not b.future.done() and not b.cancel.is_set()
    probe.release("b1", "a2")
    assert not b.future.result(5).stats.cancelled
    assert not newer.future.result(5).stats.cancelled
    assert worker.stats.cancelled_runs == 1
    worker.close()


def test_reload_stops_every_running_job_and_frees_the_old_model_after_them():
    worker, probes = overlap_worker()
    old = probes[0]
    old.stubborn.add("a")  # a long step: it returns only when released
    a = worker.submit("a", request("a"))
    tags = [f"b{i}" for i in range(1, MAX_IN_FLIGHT)]
    others = [worker.submit(tag, request(tag)) for tag in tags]
    assert all(old.started(tag) for tag in ["a", *tags])  # every runner is taken
    waiting = [worker.submit(f"w{i}", request(f"w{i}")) for i in range(MAX_PENDING_JOBS)]
    worker.load(LoadSpec(model="probe", device="cpu"))
    assert all(job.cancel.is_set() for job in [a, *others])
    assert all(job.future.result(5).stats.cancelled for job in others)
    assert all(job.future.result(5) is None for job in waiting)  # for the old model: dropped
    assert len(probes) == 1 and not old.closed  # a's runner still uses the old model
    old.release("a")
    assert a.future.result(5).stats.cancelled
    wait_until(lambda: worker.ready and len(probes) == 2)
    assert old.closed and old.active_at_close == 0
    assert {r.prefix for r in old.seen} == {"a", *tags}  # the waiting ones never ran
    worker.close()


def test_an_engine_without_concurrent_calls_gets_one_call_at_a_time():
    worker, (probe,) = overlap_worker(concurrent=False)
    a = worker.submit("a", request("a"))
    b = worker.submit("b", request("b"))
    assert probe.started("a")
    assert [r.prefix for r in probe.seen] == ["a"] and worker.jobs_in_flight == 1
    probe.release("a")
    assert probe.started("b")
    probe.release("b")
    assert a.future.result(5) is not None and b.future.result(5) is not None
    assert probe.most_at_once == 1
    assert probe.threads == ["maskfill-engine", "maskfill-engine"]  # on the owning thread
    worker.close()


def test_repeated_failures_move_the_model_after_the_other_runners_returned():
    probes: list[OverlapProbe] = []
    active_at_load: list[int] = []

    def loader(spec):
        if spec.device == "cuda":
            probe = OverlapProbe("cuda", failing=("bad",))
        else:
            active_at_load.append(probes[0].active)
            probe = OverlapProbe("cpu", hold=False)
        probes.append(probe)
        return probe

    worker = LspEngineHost(loader)
    worker.load(LoadSpec(model="probe", device="cuda", fallback_device="cpu"))
    wait_until(lambda: worker.ready)
    cuda = probes[0]
    good = worker.submit("good", request("good"))
    assert cuda.started("good")
    assert worker.submit("bad1", request("bad1")).future.result(5) is None  # failures 1, 2
    moved = worker.submit("bad2", request("bad2", max_tokens=32))  # failures 3, 4: repeated
    wait_until(lambda: worker.stats.failures == FALLBACK_AFTER_FAILURES
               and worker.jobs_in_flight == 1)  # bad2's runner returned; good still runs
    assert len(probes) == 1 and not cuda.closed and not moved.future.done()
    later = worker.submit("c", request("c"))  # waits for the move instead of failing on cuda
    assert len(probes) == 1
    cuda.release("good")
    assert not good.future.result(5).stats.cancelled  # the move did not stop a running job
    assert moved.future.result(5) is not None and later.future.result(5) is not None
    assert [p.device for p in probes] == ["cuda", "cpu"] and worker.device == "cpu"
    assert active_at_load == [0] and cuda.closed and cuda.active_at_close == 0
    assert sorted((r.prefix, r.max_tokens) for r in probes[1].seen) == [("bad2", 16), ("c", 32)]
    assert "c" not in [r.prefix for r in cuda.seen]
    worker.close()


def test_close_stops_running_jobs_and_frees_the_model_after_them():
    worker, (probe,) = overlap_worker()
    probe.stubborn.add("a")
    a = worker.submit("a", request("a"))
    b = worker.submit("b", request("b"))
    assert probe.started("a") and probe.started("b")
    worker.close(timeout=0)
    assert a.cancel.is_set() and b.cancel.is_set()
    assert b.future.result(5).stats.cancelled
    assert not probe.closed and worker.state != "closed"  # a's runner still uses the model
    assert worker.submit("c", request("c")).future.result(5) is None
    probe.release("a")
    assert a.future.result(5).stats.cancelled
    wait_until(lambda: worker.state == "closed")
    assert probe.closed and probe.active_at_close == 0


def test_close_waits_for_the_runners_it_stopped():
    worker, (probe,) = overlap_worker()
    jobs = [worker.submit(tag, request(tag)) for tag in ("a", "b")]
    assert probe.started("a") and probe.started("b")
    worker.close()  # returns once the model is freed
    assert probe.closed and probe.active_at_close == 0 and worker.state == "closed"
    assert all(job.future.result(0).stats.cancelled for job in jobs)
