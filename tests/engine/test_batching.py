"""Concurrent requests share denoising passes (engine/denoise/batch_worker.py,
engine/denoise/loop.py,
engine/denoise/static_batch.py): issue 13 item 2. Each request must get exactly what it gets alone,
whoever joins, leaves or is cancelled beside it."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from engine.api import CompletionRequest
from engine.engine import Engine, hole_lengths
from tests.fixtures.memorized import SNIPPETS, split_middle


@pytest.fixture(scope="module", params=["shrinking", "static"])
def engine(request, memorized_model):
    torch.set_num_threads(1)
    loaded = Engine.load(str(memorized_model), context_reuse=False,
                         static_shapes=request.param == "static")
    yield loaded
    loaded.close()


def requests_for(engine: Engine) -> list[CompletionRequest]:
    """Different documents, hole lengths, bucket rows and candidates."""
    tok = engine.tokenizer
    made = []
    for i, snippet in enumerate(SNIPPETS):
        n = len(tok.encode(snippet))
        prefix, middle, suffix = split_middle(tok, snippet, n // 4, 3 * n // 4)
        span = len(tok.encode(middle))
        if i % 3 == 0:
            made.append(CompletionRequest(prefix=prefix, suffix=suffix, span_lengths=(span,),
                                          max_tokens=span, stop="free"))
        elif i % 3 == 1:
            made.append(CompletionRequest(prefix=prefix, suffix=suffix, max_tokens=span + 6,
                                          stop="free"))
        else:
            made.append(CompletionRequest(prefix=prefix, suffix=suffix, max_tokens=12,
                                          num_candidates=2, seed=i, stop="block"))
    return made


class Gate:
    """Holds the worker (an exclusive job that waits) while requests queue behind it, so that
    they are admitted together."""

    def __init__(self, engine: Engine):
        self.open = threading.Event()
        self.thread = threading.Thread(
            target=lambda: engine._worker.run_exclusive(lambda: self.open.wait(30)))
        self.thread.start()

    def release(self) -> None:
        self.open.set()
        self.thread.join(30)


def run_together(engine: Engine, requests, cancels=None) -> list:
    cancels = cancels or [None] * len(requests)
    assert engine.wait_idle()
    gate = Gate(engine)
    results: list = [None] * len(requests)

    def one(i):
        results[i] = engine.complete(requests[i], cancel=cancels[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    while len(engine._worker._waiting) < len(requests):  # all queued behind the gate
        threading.Event().wait(0.01)
    gate.release()
    for thread in threads:
        thread.join(60)
    return results


def own_rows(request: CompletionRequest) -> int:
    return len(hole_lengths(request)) * request.num_candidates


def texts(result) -> list[str]:
    return [c.text for c in result.candidates]


def test_batched_requests_each_get_the_text_they_get_alone(engine):
    requests = requests_for(engine)
    alone = [engine.complete(r) for r in requests]
    passes_before = engine._worker.passes
    together = run_together(engine, requests)
    for a, b in zip(alone, together, strict=True):
        assert texts(b) == texts(a)
        assert b.stats.tokens_committed_per_step == a.stats.tokens_committed_per_step
    assert max(b.stats.batch_rows - own_rows(r) for r, b in zip(requests, together,
                                                                strict=True)) > 0
    shared = engine._worker.passes - passes_before
    assert shared < sum(b.stats.forward_passes for b in together)  # passes were shared


def test_a_cancelled_request_in_a_batch_does_not_disturb_its_neighbours(engine, monkeypatch):
    others = requests_for(engine)
    slow = dataclasses.replace(others[1], threshold=1.0)  # one slot a pass: many passes
    requests = [slow] + others
    alone = [engine.complete(r) for r in requests]
    assert alone[0].stats.forward_passes > 4
    cancel = threading.Event()
    worker = engine._worker
    real_iterate = engine._loop.iterate

    def iterate():  # cancel the first request (the first rows) after two shared passes
        if worker.passes == start + 2:
            cancel.set()
        return real_iterate()

    start = worker.passes
    monkeypatch.setattr(engine._loop, "iterate", iterate)
    together = run_together(engine, requests, cancels=[cancel] + [None] * (len(requests) - 1))
    assert together[0].stats.cancelled and together[0].text == ""
    assert together[0].stats.forward_passes <= 3
    for a, b in zip(alone[1:], together[1:], strict=True):
        assert texts(b) == texts(a) and not b.stats.cancelled


def test_a_deadline_ends_its_own_request_only(engine):
    requests = requests_for(engine)
    alone = [engine.complete(r) for r in requests]
    late = dataclasses.replace(requests[1], timeout_ms=1e-6)
    together = run_together(engine, [late] + requests[2:])
    assert together[0].stats.timed_out
    for a, b in zip(alone[2:], together[1:], strict=True):
        assert texts(b) == texts(a) and not b.stats.timed_out


def test_admission_is_first_come_first_served_within_the_row_budget(engine, monkeypatch):
    """Every request in flight advances one step per shared pass; a request waits while the
    rows in flight fill the budget, and the first one always gets in (even an oversize one)."""
    worker = engine._worker
    monkeypatch.setattr(worker, "row_budget", 4)
    monkeypatch.setattr(worker, "peak_rows", 0)
    requests = requests_for(engine)
    alone = [engine.complete(r) for r in requests]
    seen = []
    real_iterate = engine._loop.iterate

    def iterate():
        before = {id(s): s.out.forward_passes for s in engine._loop.active}
        ended = real_iterate()
        after = {id(s): s.out.forward_passes for s in engine._loop.active + ended}
        seen.append(all(after[k] == v + 1 for k, v in before.items()))
        return ended

    monkeypatch.setattr(engine._loop, "iterate", iterate)
    together = run_together(engine, requests)
    assert all(seen)
    for a, b in zip(alone, together, strict=True):
        assert texts(b) == texts(a)
    oversize = max(own_rows(r) for r in requests)
    assert worker.peak_rows <= max(4, oversize)
