"""Callers' threads never touch the model's device (issue 19).

On CUDA the engine's worker thread captures graphs on demand; while it does, no other thread may
run CUDA work, or the capture fails (and graphs are switched off for the engine's life) or the
caller gets "operation not permitted when stream is capturing". So a caller builds its job on
the CPU, the worker moves it to the device, and the result comes back as CPU tensors.

A CPU has no second device, so the test gives the engine one: its LoadedModel names
`cpu:0`, which PyTorch keeps apart from `cpu` in `.to()` and in the device an op is asked for,
while the tensors stay plain CPU tensors. A TorchDispatchMode per thread (dispatch modes are
thread-local) tags every new tensor by where it would live on a GPU machine:
- on the worker: a copy to `cpu` is a host tensor, and so is what is computed from host tensors
  only; everything else it makes (factories, anything computed from a device tensor) is a
  device tensor, as are the model's weights and the engine's own tensors;
- on a caller: everything it makes is the caller's, and it must never take a device tensor as
  an input nor ask for one (an op on `cpu:0`).
`Tensor.tolist()` reads memory without dispatching an op, so what the worker hands back (the
`Denoised` of each request) is checked to be host tensors, too.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.api import CompletionRequest
from engine.denoise.batch_worker import BatchWorker
from engine.engine import Engine
from engine.model.weights import load_model
from tests.fixtures.memorized import SNIPPETS, split_middle

aten = torch.ops.aten
FAKE_DEVICE = torch.device("cpu", 0)
HOST = torch.device("cpu")
DEVICE, HOST_TENSOR, CALLER = "device", "host", "caller"


def _storage(t: torch.Tensor) -> int | None:
    if t.device.type != "cpu" or t.untyped_storage().nbytes() == 0:
        return None
    return t.untyped_storage().data_ptr()


class Where:
    """The latest tag of every storage address (an address freed and reused is re-tagged by
    whoever allocates it next), and what callers did wrong."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tags: dict[int, str] = {}
        self.violations: list[str] = []

    def tag(self, tensor: torch.Tensor, tag: str) -> None:
        ptr = _storage(tensor)
        if ptr is not None:
            with self.lock:
                self.tags[ptr] = tag

    def of(self, tensor: torch.Tensor) -> str | None:
        ptr = _storage(tensor)
        with self.lock:
            return None if ptr is None else self.tags.get(ptr)


class Recorder(TorchDispatchMode):
    def __init__(self, where: Where, role: str):
        super().__init__()
        self.where, self.role = where, role

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        inputs = [t for t in leaves if isinstance(t, torch.Tensor)]
        asked = next((d for d in leaves if isinstance(d, torch.device)), None)
        if self.role == CALLER:
            if func.overloadpacket is aten.lift_fresh:
                # torch.tensor(data) fills a new tensor without dispatching an op, at an
                # address the worker may have freed a moment ago (its tag is stale): it is
                # the caller's own, made on the host.
                for t in inputs:
                    self.where.tag(t, CALLER)
            touched = [self.where.of(t) for t in inputs]
            if DEVICE in touched:
                self.where.violations.append(f"{func} read a device tensor")
            if asked == FAKE_DEVICE:
                self.where.violations.append(f"{func} placed a tensor on the device")
        out = func(*args, **kwargs)
        seen = {_storage(t) for t in inputs}
        fresh = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and
                 _storage(t) not in seen]
        for t in fresh:
            self.where.tag(t, self._tag(func, asked, inputs))
        return out

    def _tag(self, func, asked, inputs) -> str:
        if self.role == CALLER:
            return CALLER
        if asked == HOST and func.overloadpacket in (aten._to_copy, aten.to):
            return HOST_TENSOR  # a copy to the host
        if asked == FAKE_DEVICE or not inputs or func.overloadpacket is aten.lift_fresh:
            return DEVICE  # made on the device (or unknown: counted as the device's)
        tags = {self.where.of(t) for t in inputs}
        return DEVICE if DEVICE in tags or None in tags else HOST_TENSOR


@pytest.fixture
def fake_device_engine(memorized_model, request, monkeypatch):
    """An engine whose device is `cpu:0`, its worker recorded; yields (engine, where, results)."""
    where = Where()
    results = []
    real_main = BatchWorker._main

    def recorded_main(self):
        with Recorder(where, "worker"):
            real_main(self)

    monkeypatch.setattr(BatchWorker, "_main", recorded_main)
    real_run = Engine._run

    def run(self, job):
        done = real_run(self, job)
        results.append(done)
        return done

    monkeypatch.setattr(Engine, "_run", run)
    loaded = dataclasses.replace(load_model(str(memorized_model)), device=FAKE_DEVICE)
    engine = Engine(loaded, model_spec=str(memorized_model), quant="none", load_ms=0.0,
                    static_shapes=request.param)
    for tensor in (*loaded.model.parameters(), *loaded.model.buffers(), engine._banned_all,
                   engine._banned_fixed):
        where.tag(tensor, DEVICE)
    try:
        yield engine, where, results
    finally:
        engine.close()


def _requests(engine: Engine) -> list[CompletionRequest]:
    out = []
    for snippet in SNIPPETS[:4]:
        n = len(engine.tokenizer.encode(snippet))
        prefix, _, suffix = split_middle(engine.tokenizer, snippet, n // 3, 2 * n // 3)
        out.append(CompletionRequest(prefix=prefix, suffix=suffix, max_tokens=16, stop="free",
                                     num_candidates=2))
    return out


def at_once(work, count: int) -> list:
    """work(i) on `count` threads started together (they share passes on the worker); the
    results in order. A caller's exception fails the test."""
    answers: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def caller(i: int) -> None:
        try:
            start.wait()
            answers[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return [answers[i] for i in range(count)]


@pytest.mark.parametrize("fake_device_engine", [False, True], indirect=True,
                         ids=["shrinking", "static-shapes"])
def test_callers_never_touch_a_device_tensor(fake_device_engine):
    engine, where, results = fake_device_engine
    requests = _requests(engine)

    def cold_then_warm(i: int) -> str:  # the second time from the context cache
        with Recorder(where, CALLER):
            return engine.complete(requests[i]).text + engine.complete(requests[i]).text

    assert all(at_once(cold_then_warm, len(requests)))
    assert engine.context_stats()["hits"] > 0
    assert where.violations == []
    assert len(results) == 2 * len(requests)
    for done in results:
        for name in ("hole", "confidence", "forced"):
            tensor = getattr(done, name)
            assert tensor.device == HOST and where.of(tensor) == HOST_TENSOR, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_captured_on_demand_while_callers_wait_stay_on(memorized_model):
    """On CUDA, with no shape captured at load: four callers at once make the worker capture
    new shapes mid-flight. No capture fails (graphs stay on), and every answer is the one the
    same request gets alone."""
    engine = Engine.load(str(memorized_model), device="cuda", warm=False)
    try:
        requests = _requests(engine)
        alone = [engine.complete(r).text for r in requests]
    finally:
        engine.close()
    fresh = Engine.load(str(memorized_model), device="cuda", warm=False)
    try:
        together = at_once(lambda i: fresh.complete(requests[i]).text, len(requests))
        assert fresh.graph_failures == []
        assert together == alone
    finally:
        fresh.close()
