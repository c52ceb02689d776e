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
from lsp_server.worker import FALLBACK_AFTER_FAILURES, MAX_PENDING_JOBS, EngineWorker, LoadSpec

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


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def probe_worker():
    probes = []
    events = []

    def loader(spec):
        probe = SchedulingProbe(spec.device)
        probes.append(probe)
        return probe

    worker = EngineWorker(loader, on_event=lambda kind, payload: events.append((kind, payload)))
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

    worker = EngineWorker(loader)
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

    worker = EngineWorker(loader, on_event=lambda kind, payload: events.append((kind, payload)))
    worker.load(LoadSpec(model="m", device="cuda", fallback_device="cpu"))
    wait_until(lambda: worker.ready)
    assert worker.device == "cpu"
    assert events[-1][0] == "load-end" and events[-1][1]["fellBack"]

    def broken(spec):
        raise EngineError("config.json is missing")

    failing = EngineWorker(broken, on_event=lambda kind, payload: events.append((kind, payload)))
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
    import lsp_server.worker as worker_module

    monkeypatch.setattr(worker_module, "default_model_path", lambda: None)
    events = []
    worker = EngineWorker(
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

    worker = EngineWorker(loader)
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

    worker = EngineWorker(slow_loader)
    worker.load(LoadSpec(model="probe"))
    wait_until(lambda: worker._in_loader)
    worker.close(timeout=30)
    assert worker._in_loader and not gate.is_set()  # returned while the load still runs
    gate.set()
    wait_until(lambda: worker.state == "closed")  # the thread frees what it loaded
