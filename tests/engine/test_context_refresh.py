"""A worn reuse chain encoded afresh in the background (engine/denoise/context_refresh.py) and the
worker's queue of idle tasks it shares with the speculation (engine/denoise/batch_worker.py): issue
13 item 1, "refresh fully after N reuses", off the keystroke path."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import engine.engine as engine_module
from engine.api import CompletionRequest
from engine.denoise import batch_worker
from engine.denoise.batch_worker import BatchWorker
from engine.denoise.context_cache import CachedContext, ContextCache
from engine.engine import Engine
from engine.model.transformer import ENCODE_GATE
from tests.fixtures.memorized import SNIPPETS, split_middle

MAX_REUSES = 2  # a short chain: cold, 2 warm hops, worn
SPAN = 4


@pytest.fixture(scope="module")
def engines(memorized_model):
    torch.set_num_threads(1)
    made = {
        "warm": Engine.load(str(memorized_model), max_reuses=MAX_REUSES, speculate=False),
        "speculating": Engine.load(str(memorized_model), max_reuses=MAX_REUSES),
        "cold": Engine.load(str(memorized_model), context_reuse=False),
    }
    yield made
    for engine in made.values():
        engine.close()


@pytest.fixture
def refreshed(monkeypatch):
    """Every refresh the engines run: (the worn entry, the fresh one, cache bytes and entries
    just before)."""
    calls = []
    real = engine_module.refresh_context

    def spy(model, args, cache, worn, *rest):
        before = (cache.nbytes, len(cache))
        fresh = real(model, args, cache, worn, *rest)
        calls.append((worn, fresh, before))
        return fresh

    monkeypatch.setattr(engine_module, "refresh_context", spy)
    return calls


def typing_chain(tokenizer, n: int, snippet: str = SNIPPETS[4]) -> list[CompletionRequest]:
    """n requests one typed token apart, same suffix and hole: the last one's middle is the
    memorized one."""
    end = len(tokenizer.encode(snippet)) - 3
    last = end - SPAN
    requests = []
    for start in range(last - n + 1, last + 1):
        prefix, _, suffix = split_middle(tokenizer, snippet, start, end)
        requests.append(CompletionRequest(prefix=prefix, suffix=suffix, span_lengths=(SPAN,),
                                          max_tokens=SPAN, stop="free"))
    return requests


def entry_for(engine: Engine, request: CompletionRequest) -> CachedContext | None:
    """The cache entry the request's context left (the single-row batch's context)."""
    from engine.denoise import fim
    from engine.denoise.prefill import context_ids

    budget = fim.context_budget(engine.args, SPAN, None)
    prefix_ids, suffix_ids = engine._context_ids(request.prefix, request.suffix, budget)
    batch = fim.build_infill_batch(engine.args, prefix_ids, suffix_ids, [SPAN])
    return engine._cache.find(*context_ids(batch), SPAN)


def test_a_worn_chain_is_encoded_afresh_when_idle_and_the_next_request_starts_warm(engines,
                                                                                 refreshed):
    engine, cold = engines["warm"], engines["cold"]
    cache = engine._cache
    assert engine.wait_idle()
    cache.clear()
    counted = cache.refreshes
    requests = typing_chain(engine.tokenizer, MAX_REUSES + 2)
    for k, request in enumerate(requests[:MAX_REUSES + 1]):
        result = engine.complete(request)
        assert (result.stats.reused_context_tokens > 0) == (k > 0)
        assert engine.wait_idle()
        assert len(refreshed) == (1 if k == MAX_REUSES else 0)  # only a worn entry is redone
    ((worn, fresh, (bytes_before, entries_before)),) = refreshed
    assert worn.reuses == MAX_REUSES and fresh is not None and fresh.reuses == 0
    assert torch.equal(fresh.lead, worn.lead) and torch.equal(fresh.tail, worn.tail)
    entries = cache.entries()
    assert fresh in entries and worn not in entries  # replaced, not added
    assert (cache.nbytes, len(cache)) == (bytes_before, entries_before)
    assert engine.context_stats()["refreshes"] == cache.refreshes == counted + 1

    # Without the refresh this request would encode from scratch (the worn entry is not
    # reused; test_reuse.py's chain test): now it is warm, one hop from a full encode, and
    # gives the cold engine's completion, the memorized middle.
    after = requests[MAX_REUSES + 1]
    hot = engine.complete(after)
    assert hot.stats.reused_context_tokens > 0
    assert hot.text == cold.complete(after).text
    assert entry_for(engine, after).reuses == 1

    # The fresh entry is what a cold request of that context leaves: the same encode.
    assert engine.wait_idle()
    cache.clear()
    engine.complete(requests[MAX_REUSES])
    again = entry_for(engine, requests[MAX_REUSES])
    assert again.reuses == 0
    for mine, theirs in ((fresh.k, again.k), (fresh.v, again.v)):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_a_request_that_arrives_first_drops_the_refresh(engines, refreshed, monkeypatch):
    engine, cold = engines["warm"], engines["cold"]
    cache, worker = engine._cache, engine._worker
    assert engine.wait_idle()
    cache.clear()
    counted = cache.refreshes
    monkeypatch.setattr(batch_worker, "IDLE_GRACE_S", 3600.0)  # the worker is never idle enough
    requests = typing_chain(engine.tokenizer, MAX_REUSES + 2)
    for request in requests[:MAX_REUSES + 1]:
        engine.complete(request)
    worn = entry_for(engine, requests[MAX_REUSES])
    assert worn.reuses == MAX_REUSES and list(worker._idle_tasks) == [worn]  # pending
    after = requests[MAX_REUSES + 1]
    first = engine.complete(after)
    # The request went first, exactly as without any refresh: cold (its chain is worn), the
    # cold engine's text, and the refresh is gone rather than run after it.
    assert first.stats.reused_context_tokens == 0
    assert first.text == cold.complete(after).text
    assert not worker._idle_tasks and engine.wait_idle()
    assert refreshed == [] and cache.refreshes == counted
    assert entry_for(engine, after).reuses == 0


def test_the_refresh_runs_before_the_speculation_which_grows_from_the_fresh_entry(
        engines, refreshed, monkeypatch):
    engine = engines["speculating"]
    cache = engine._cache
    order = []
    real = engine_module.speculate_accepted

    def speculate(*args, **kwargs):
        order.append("speculate")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "speculate_accepted", speculate)
    assert engine.wait_idle()
    cache.clear()
    # Speculations hit along the way shorten the chain: type until a refresh happened.
    for request in typing_chain(engine.tokenizer, 3 * MAX_REUSES):
        order.clear()
        result = engine.complete(request)
        assert engine.wait_idle()
        if refreshed:
            break
    assert refreshed and result.text, "the chain never wore out"
    ((worn, fresh, _),) = refreshed
    assert order == ["speculate"] and fresh in cache.entries()
    # The speculation ran after the refresh: it grew from the fresh entry, so it is usable
    # (grown from the worn one it would have been worn at birth, and never reused).
    (speculated,) = [e for e in cache.entries() if e.speculative]
    assert speculated.parent is fresh and speculated.reuses == 1


@pytest.mark.parametrize("option", ["context_reuse", "concurrent"])
def test_without_reuse_or_a_worker_nothing_runs_in_the_background(memorized_model, refreshed,
                                                                  monkeypatch, option):
    engine = Engine.load(str(memorized_model), max_reuses=MAX_REUSES, **{option: False})
    queued = []
    if engine._worker is not None:
        monkeypatch.setattr(engine._worker, "when_idle", lambda *a, **k: queued.append(a))
    try:
        warm = []
        for request in typing_chain(engine.tokenizer, MAX_REUSES + 2):
            result = engine.complete(request)
            assert engine.wait_idle()
            warm.append(result.stats.reused_context_tokens > 0)
        assert refreshed == [] and queued == [] and engine.context_stats()["refreshes"] == 0
        if option == "concurrent":  # the request after the worn entry encodes it itself
            assert warm == [False] + [True] * MAX_REUSES + [False]
        else:
            assert not any(warm)
    finally:
        engine.close()


def test_replacing_a_worn_entry_keeps_its_place_and_its_speculations():
    def entry(lead: list[int], reuses: int = 0) -> CachedContext:
        k = [torch.zeros(1, len(lead) + 2, 4)]
        return CachedContext(lead=torch.tensor(lead), tail=torch.tensor([7, 8]), hole=4, k=k,
                             v=[torch.zeros_like(k[0])], reuses=reuses)

    cache = ContextCache(max_reuses=2)
    worn, other = entry([1, 2, 3], reuses=2), entry([4, 5, 6])
    child = entry([1, 2, 3, 9], reuses=3)
    child.speculative, child.parent = True, worn
    for e in (worn, other, child):
        cache.put(e)
    assert cache.worn(worn) and not cache.worn(other)
    assert cache.find(worn.lead, worn.tail, 4) is worn
    assert cache.find(child.lead, child.tail, 4) is None  # speculations are nobody's context
    fresh = entry([1, 2, 3])
    size = cache.nbytes
    assert cache.replace(worn, fresh)
    assert cache.entries() == [fresh, other, child] and child.parent is fresh
    assert cache.nbytes == size and cache.refreshes == 1
    assert not cache.replace(worn, entry([1, 2, 3]))  # gone already: nothing is added
    assert cache.entries() == [fresh, other, child] and cache.refreshes == 1


class IdleLoop:
    """The part of a DenoiseLoop the worker looks at when no request is in flight."""

    active: list = []
    rows = 0

    def abort(self) -> list:
        return []


def test_idle_tasks_run_refresh_first_newest_speculation_and_a_request_drops_them(monkeypatch):
    worker = BatchWorker(IdleLoop(), row_budget=4, name="test-idle")
    ran = []
    try:
        with worker._cond:  # all queued before the worker looks
            worker.when_idle(lambda: ran.append("old speculation"), key="speculate")
            worker.when_idle(lambda: ran.append("refresh a"), key="a", first=True)
            worker.when_idle(lambda: ran.append("refresh b"), key="b", first=True)
            worker.when_idle(lambda: ran.append("dropped"), key="c")
            worker.when_idle(None, key="c")
            worker.when_idle(lambda: ran.append("speculation"), key="speculate")
        assert worker.wait_idle()
        assert ran == ["refresh b", "refresh a", "speculation"]

        monkeypatch.setattr(batch_worker, "IDLE_GRACE_S", 3600.0)
        ran.clear()
        with worker._cond:
            worker._idle_since = time.monotonic()  # a request just left
            worker.when_idle(lambda: ran.append("refresh"), key="a", first=True)
            worker.when_idle(lambda: ran.append("speculation"), key="speculate")
        assert worker.run_exclusive(lambda: ran.append("request") or "answer") == "answer"
        assert worker.wait_idle() and ran == ["request"]
    finally:
        worker.close()


def test_a_request_that_arrives_mid_refresh_stops_its_encode_between_layers(engines,
                                                                           monkeypatch):
    engine, cold = engines["warm"], engines["cold"]
    cache, worker = engine._cache, engine._worker
    assert engine.args.n_layers > 1 and engine.wait_idle()
    cache.clear()
    counted, interrupted = cache.refreshes, worker.interrupted
    started, layers = threading.Event(), []
    real = engine_module.refresh_context

    def refresh_once_a_request_waits(*args):
        started.set()
        while not worker._waiting:  # the request below is queued behind this refresh
            time.sleep(0.001)
        gate = ENCODE_GATE.get()  # the worker's: it raises once a request waits

        def counted_gate(hidden):
            layers.append(1)
            gate(hidden)

        token = ENCODE_GATE.set(counted_gate)
        try:
            return real(*args)
        finally:
            ENCODE_GATE.reset(token)

    monkeypatch.setattr(engine_module, "refresh_context", refresh_once_a_request_waits)
    requests = typing_chain(engine.tokenizer, MAX_REUSES + 2)
    for request in requests[:MAX_REUSES]:
        engine.complete(request)
        assert engine.wait_idle()
    engine.complete(requests[MAX_REUSES])  # leaves the worn entry: its refresh is queued
    assert started.wait(30)
    after = requests[MAX_REUSES + 1]
    answer = {}
    waiting = threading.Thread(target=lambda: answer.update(result=engine.complete(after)))
    waiting.start()
    waiting.join(60)
    # The encode stopped at its first layer boundary; the request ran as it would have without
    # any refresh (cold: its chain is worn) and left a fresh entry itself.
    assert layers == [1] and worker.interrupted == interrupted + 1
    assert cache.refreshes == counted and engine.context_stats()["idle_interrupted"] >= 1
    assert answer["result"].stats.reused_context_tokens == 0
    assert answer["result"].text == cold.complete(after).text
    assert engine.wait_idle() and entry_for(engine, after).reuses == 0


def test_the_encode_gate_runs_between_layers_only_while_set(engines):
    model = engines["cold"]._loaded.model
    ids = torch.tensor([engines["cold"].tokenizer.encode("def f(x):\n    return x\n")])
    positions = torch.arange(ids.shape[1])[None]
    seen = []
    with torch.inference_mode():
        whole, _ = model.encode(ids, positions)
        token = ENCODE_GATE.set(lambda hidden: seen.append(hidden.shape))
        try:
            gated, _ = model.encode(ids, positions)
        finally:
            ENCODE_GATE.reset(token)
        model.encode(ids, positions)
    assert len(seen) == model.args.n_layers - 1  # between layers, not before or after
    assert torch.equal(gated, whole)
