"""CUDA-only checks of the fast path (issue 10): graphed passes equal eager ones, graphs are
captured once per shape bucket, the loop does not sync inside its interval, and every quantized
mode runs its fast kernel and stays close to bf16. All skip cleanly without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.api import CompletionRequest
from engine.bench.opcount import DispatchCounter
from engine.denoise.kv_arena import Layout
from engine.engine import Engine
from engine.model.quantize import quantize_model, use_fast_kernels
from tests.engine.test_quantize import cosine, logits_of, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
FAST = {"int8": {"Int8Linear": "int_mm", "QuantizedEmbedding": "int_mm"},
        "int4": {"Int4Linear": "tinygemm", "QuantizedEmbedding": "dequant"},
        "fp8": {"Fp8Linear": "scaled_mm"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    # dim 128 / ffn 256: every matrix fits the fast kernels' tiles (tinygemm wants K % 128 == 0)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gpu-static") / "d", "dream", dim=128,
                                ffn_dim=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_graphed_pass_gives_the_eager_pass_logits(checkpoint, dtype):
    from engine.denoise.fim import build_infill_batch
    from engine.denoise.graphs import PassCache
    from engine.denoise.static_batch import StaticBatch

    engine = Engine.load(str(checkpoint), device="cuda", dtype=str(dtype).removeprefix("torch."),
                         warm=False)
    try:
        loaded = engine._loaded
        args, model = loaded.args, loaded.model
        tok = engine.tokenizer
        batch = build_infill_batch(args, tok.encode(PREFIX), tok.encode(SUFFIX), [4, 9, 16],
                                   "cuda")
        layout = Layout.of(batch, args, static=True)
        logits = {}
        with torch.inference_mode():
            for graphs in (False, True):
                cache = PassCache(model, args, loaded.dtype, loaded.device, engine._banned_all,
                                  use_graphs=graphs)
                shared = StaticBatch(model, args, cache, engine._banned_all)
                shared.join(batch, layout, None, None, keep=False)
                static = shared.static
                assert static.graphed == graphs and not cache.failures
                logits[graphs] = static.logits().clone()
                logits[graphs, "again"] = static.logits().clone()
        torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
        assert torch.equal(logits[True], logits[True, "again"])
    finally:
        engine.close()


def test_graphs_are_captured_at_load_and_reused_per_bucket(checkpoint):
    engine = Engine.load(str(checkpoint), device="cuda")
    try:
        cache = engine._passes
        assert cache is not None and cache.use_graphs and not engine.graph_failures
        warmed = cache.captures
        assert warmed >= 2  # the line and block shapes of every context bucket in the window
        base = dict(suffix=SUFFIX, span_lengths=(5, 12), max_tokens=12, stop="free")
        first = engine.complete(CompletionRequest(prefix=PREFIX, **base))
        after_first = cache.captures
        assert after_first <= warmed + 1
        # Warm from the first: a join pass (captured once per bucket), then the same shape.
        second = engine.complete(CompletionRequest(prefix=PREFIX + "a + ", **base))
        after_second = cache.captures
        third = engine.complete(CompletionRequest(prefix=PREFIX + "a + b * c - ", **base))
        assert cache.captures == after_second <= after_first + 1  # replayed, not recorded
        assert second.stats.reused_context_tokens > 0 and third.stats.reused_context_tokens > 0
        assert first.candidates and second.candidates and third.candidates
    finally:
        engine.close()


def test_the_cuda_loop_syncs_once_per_check_interval(checkpoint, monkeypatch):
    engine = Engine.load(str(checkpoint), device="cuda")
    real_iterate = engine._loop.iterate
    counted = {"syncs": 0}

    def iterate():  # counted on the worker thread, where the passes run
        with DispatchCounter() as log:
            ended = real_iterate()
        counted["syncs"] += log.syncs
        return ended

    monkeypatch.setattr(engine._loop, "iterate", iterate)
    engine.check_every = 4
    try:
        result = engine.complete(CompletionRequest(
            prefix=PREFIX, suffix=SUFFIX, span_lengths=(6, 12), max_tokens=12, threshold=1.0,
            stop="free"))
    finally:
        engine.close()
    counted["passes"] = result.stats.forward_passes
    assert counted["passes"] >= 8
    # One read every 4 steps, the final transfer, and encode_ms's one synchronize (a device
    # sync, not a dispatched op, so it does not count here).
    assert counted["syncs"] <= -(-counted["passes"] // 4) + 1


@pytest.mark.parametrize("mode,bar", [("int8", 0.99), ("int4", 0.98), ("fp8", 0.99)])
def test_each_quant_mode_runs_its_fast_kernel_close_to_bf16(mode, bar):
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs an sm89+ GPU")
    model = tiny_model(seed=12).to(torch.bfloat16).cuda()
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(13)).cuda()
    reference = logits_of(model, ids)
    quantized = quantize_model(copy.deepcopy(model), mode, device="cuda").cuda()
    assert use_fast_kernels(quantized) == FAST[mode]
    assert cosine(logits_of(quantized, ids), reference) >= bar


@pytest.mark.parametrize("mode", ["none", "int8", "int4", "fp8"])
def test_a_quantized_cuda_engine_completes_through_graphs(checkpoint, mode):
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs an sm89+ GPU")
    engine = Engine.load(str(checkpoint), device="cuda", dtype="bf16", quant=mode)
    try:
        if mode != "none":
            assert engine._loaded.kernels == FAST[mode]
        assert not engine.graph_failures
        result = engine.complete(CompletionRequest(prefix=PREFIX, suffix=SUFFIX, max_tokens=16,
                                                   stop="free", seed=0))
        assert result.stats.forward_passes >= 1 and not result.stats.cancelled
    finally:
        engine.close()


def test_concurrent_requests_share_graphed_passes_and_get_their_own_text(memorized_model):
    """Issue 13 on CUDA: requests in flight together run in one static batch (graphs per
    bucket), and each gets the text it gets alone; a warm request replays the join graph."""
    from tests.engine.test_batching import requests_for, run_together, texts

    engine = Engine.load(str(memorized_model), device="cuda", context_reuse=False)
    try:
        requests = requests_for(engine)
        alone = [engine.complete(r) for r in requests]
        together = run_together(engine, requests)
        for a, b in zip(alone, together, strict=True):
            assert texts(b) == texts(a)
        assert max(b.stats.batch_rows for b in together) > max(a.stats.batch_rows for a in alone)
        assert not engine.graph_failures
    finally:
        engine.close()
    warm = Engine.load(str(memorized_model), device="cuda")
    try:
        base = dict(suffix=SUFFIX, span_lengths=(6,), max_tokens=6, stop="free")
        warm.complete(CompletionRequest(prefix=PREFIX, **base))
        again = warm.complete(CompletionRequest(prefix=PREFIX + "a + ", **base))
        assert again.stats.reused_context_tokens > 0 and not warm.graph_failures
    finally:
        warm.close()
