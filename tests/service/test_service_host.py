"""The engine service's model thread: fair turns between clients, newest-wins per key,
cancellation, the exact-request cache. The engine here is a recorder whose runs block until
the test releases them, so every ordering is decided by the test, not by timing."""

from __future__ import annotations

import queue
import threading

import pytest

from engine.api import CompletionRequest, CompletionResult, CompletionStats, EngineInfo
from engine.serve.host import Job, ServiceHost

WAIT_S = 30.0


class GatedEngine:
    """Records the prefixes it runs; each run waits for `release` (or its cancel Event)."""

    def __init__(self) -> None:
        self.started: queue.Queue[str] = queue.Queue()
        self.release = threading.Semaphore(0)

    def complete(self, request: CompletionRequest, cancel=None) -> CompletionResult:
        self.started.put(request.prefix)
        while not self.release.acquire(timeout=0.01):
            if cancel is not None and cancel.is_set():
                return CompletionResult(text="", candidates=[],
                                        stats=CompletionStats(cancelled=True))
        return CompletionResult(text=request.prefix.upper(), candidates=[],
                                stats=CompletionStats(forward_passes=2,
                                                      tokens_committed_per_step=[1, 1]))

    def info(self) -> EngineInfo:
        return EngineInfo(model="gated", path="-", family="dream", device="cpu", dtype="float32",
                          quant="none", weight_bytes=1234, parameters=1, max_context=64,
                          load_ms=0.0)

    def close(self) -> None:
        pass


class Answers:
    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, CompletionResult | None, str | None]] = queue.Queue()

    def job(self, client: int, job_id: int, prefix: str, key: str = "", **knobs) -> Job:
        knobs = {"temperature": 0.5, **knobs}  # sampled: uncacheable unless a test says so
        request = CompletionRequest(prefix=prefix, suffix="", **knobs)
        return Job(client=client, id=job_id, key=key, request=request,
                   reply=lambda result, error: self.items.put((prefix, result, error)))

    def next(self):
        return self.items.get(timeout=WAIT_S)


@pytest.fixture
def engine():
    return GatedEngine()


@pytest.fixture
def scheduler(engine):
    s = ServiceHost(lambda: engine)
    assert s.wait_loaded(WAIT_S) and s.state == "ready"
    yield s
    s.close()


def test_clients_take_turns(engine, scheduler):
    answers = Answers()
    scheduler.submit(answers.job(1, 1, "a-blocker"))
    assert engine.started.get(timeout=WAIT_S) == "a-blocker"
    for i in range(3):  # a busy client queues three jobs ...
        scheduler.submit(answers.job(1, 10 + i, f"a{i}"))
    scheduler.submit(answers.job(2, 1, "b0"))  # ... the others one each, later
    scheduler.submit(answers.job(3, 1, "c0"))
    order = []
    for _ in range(6):
        engine.release.release()
        order.append(answers.next()[0])
    assert order == ["a-blocker", "a0", "b0", "c0", "a1", "a2"]


def test_newest_wins_per_client_and_key(engine, scheduler):
    answers = Answers()
    scheduler.submit(answers.job(1, 1, "old-running", key="doc"))
    assert engine.started.get(timeout=WAIT_S) == "old-running"
    scheduler.submit(answers.job(1, 2, "old-pending", key="doc"))
    scheduler.submit(answers.job(2, 1, "other-client", key="doc"))  # same key, other client
    scheduler.submit(answers.job(1, 3, "newest", key="doc"))
    results = {}
    for _ in range(2):  # the running one stops between steps, the pending one never runs
        prefix, result, error = answers.next()
        results[prefix] = result
    assert results["old-pending"] is None
    assert results["old-running"].stats.cancelled
    engine.release.release()
    engine.release.release()
    done = {answers.next()[0] for _ in range(2)}
    assert done == {"other-client", "newest"}


def test_cancel_and_drop_client(engine, scheduler):
    answers = Answers()
    scheduler.submit(answers.job(1, 1, "running"))
    assert engine.started.get(timeout=WAIT_S) == "running"
    scheduler.submit(answers.job(1, 2, "pending"))
    scheduler.submit(answers.job(2, 1, "gone-pending"))
    scheduler.cancel(1, 2)
    assert answers.next() == ("pending", None, None)
    scheduler.drop_client(2)
    assert answers.next() == ("gone-pending", None, None)
    scheduler.cancel(1, 1)
    prefix, result, _ = answers.next()
    assert prefix == "running" and result.stats.cancelled
    assert scheduler.queue_depth() == 0
    assert scheduler.stats.snapshot()["requests"]["dropped"] == 2


def test_deterministic_requests_are_answered_from_the_cache(engine, scheduler):
    answers = Answers()
    scheduler.submit(answers.job(1, 1, "same", temperature=0.0))
    engine.release.release()
    first = answers.next()[1]
    scheduler.submit(answers.job(2, 1, "same", temperature=0.0, timeout_ms=5.0))
    second = answers.next()[1]  # no release needed: the model did not run
    assert second is first
    assert scheduler.stats.cache_hits == 1 and engine.started.qsize() == 1


def test_a_failed_load_is_reported_to_every_request():
    def broken():
        raise RuntimeError("CUDA out of memory\nlong trace")

    s = ServiceHost(broken)
    assert s.wait_loaded(WAIT_S)
    answers = Answers()
    s.submit(answers.job(1, 1, "x"))
    # engine.api.one_line, the one rule (issue 22): every line of the message, joined (the
    # scheduler's own copy kept the first line only)
    assert answers.next() == ("x", None, "the model did not load: CUDA out of memory long trace")
    assert s.state == "failed"
    s.close()


def test_several_jobs_run_at_once_when_the_engine_batches(engine):
    """max_in_flight > 1: the engine (which batches concurrent calls into shared passes) gets
    several jobs at once, still taken from the clients in turn; newest-wins still cancels."""
    s = ServiceHost(lambda: engine, max_in_flight=3)
    try:
        assert s.wait_loaded(WAIT_S)
        answers = Answers()
        for i in range(3):
            s.submit(answers.job(1, 10 + i, f"a{i}", key=f"doc{i}"))
        s.submit(answers.job(2, 1, "b0"))
        started = {engine.started.get(timeout=WAIT_S) for _ in range(3)}
        assert started == {"a0", "b0", "a1"}  # three in flight, client 2 not behind client 1
        assert s.busy and s.queue_depth() == 4
        s.submit(answers.job(1, 20, "a0-newer", key="doc0"))  # stops the running a0
        prefix, result, _ = answers.next()
        assert prefix == "a0" and result.stats.cancelled
        assert engine.started.get(timeout=WAIT_S) in {"a2", "a0-newer"}
        for _ in range(4):
            engine.release.release()
        done = {answers.next()[0] for _ in range(4)}
        assert done == {"b0", "a1", "a2", "a0-newer"}
        assert s.queue_depth() == 0
    finally:
        s.close()
