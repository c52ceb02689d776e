"""The static-shape pass on a CPU: what CUDA graphs need, proven without a GPU (issue 10 item 6).

(a) every pass of a request sees one input shape (and requests of one bucket share it);
(b) the loop makes at most one host sync per check interval;
(c) fused and quantized layers give the logits of the plain model;
plus: static decoding gives the same text as the other paths, and a pass stays within its
ATen op budget (20 per layer + 60).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.api import CompletionRequest
from engine.bench.opcount import DispatchCounter
from engine.denoise import passes
from engine.engine import Engine
from engine.model.quantize import quantize_model, use_fast_kernels
from engine.model.weights import fuse_projections, split_projections
from tests.engine.test_quantize import cosine, logits_of, tiny_model
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.memorized import SNIPPETS, split_middle

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"

@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("static")
    made = {
        "static": Engine.load(str(make_tiny_checkpoint(root / "d", "dream")), static_shapes=True),
        "shrinking": Engine.load(str(make_tiny_checkpoint(root / "d", "dream"))),
        "one-static": Engine.load(str(make_tiny_checkpoint(root / "one", "dream", n_layers=1)),
                                  static_shapes=True),
        "one-layer": Engine.load(str(make_tiny_checkpoint(root / "one", "dream", n_layers=1))),
    }
    yield made
    for engine in made.values():
        engine.close()


def record_step_shapes(engine, monkeypatch) -> list[tuple]:
    model = engine._loaded.model
    real_step = model.step
    seen = []

    def step(ids, rope, slots):
        at = (slots.at.start, slots.at.stop) if isinstance(slots.at, slice) else \
            tuple(slots.at.shape)
        seen.append((tuple(ids.shape), tuple(rope.cos.shape), tuple(slots.k[0].shape),
                     tuple(slots.bias.shape), at))
        return real_step(ids, rope, slots)

    monkeypatch.setattr(model, "step", step)
    return seen


def test_every_pass_of_a_request_sees_one_shape_and_one_bucket_shares_it(engines, monkeypatch):
    """Graph replays need fixed shapes: a cold request runs one shape throughout. A request
    whose context comes from the cache adds one join pass (the changed tokens, in a bucket of
    REFRESH_BUCKETS entries) and then runs the very same shape."""
    from engine.denoise.buckets import REFRESH_BUCKETS

    engine = engines["static"]
    monkeypatch.setattr(engine, "_speculate", False)  # its idle-time pass is no request's
    seen = record_step_shapes(engine, monkeypatch)
    base = dict(suffix=SUFFIX, span_lengths=(5, 12), max_tokens=12, threshold=1.0, stop="free")
    first = engine.complete(CompletionRequest(prefix="# static\n" + PREFIX, **base))
    assert first.stats.forward_passes >= 5 and len(seen) == first.stats.forward_passes
    assert len(set(seen)) == 1 and first.stats.reused_context_tokens == 0
    regular = seen[0]
    ids_shape, _, kv_shape, _, (start, stop) = regular
    assert ids_shape == (2, 16 + 1)  # 2 rows, the 16-slot hole bucket plus the lead entry
    assert stop - start == 16 + 1 and stop < kv_shape[2]  # the query block, written in place
    joins = set()
    for typed in ("a + ", "a + b * 2 + "):  # longer, same bucket, and warm
        seen.clear()
        warm = engine.complete(CompletionRequest(prefix="# static\n" + PREFIX + typed, **base))
        assert warm.stats.reused_context_tokens > 0 and len(seen) == warm.stats.forward_passes
        join, *rest = seen
        assert set(rest) == {regular}
        joins.add(join)
    # When only the token before the hole changed, nothing needs a join pass: it is in the
    # query block anyway.
    (join,) = joins - {regular}
    assert join[0] == (2, REFRESH_BUCKETS[0] + 16 + 1) and join[2] == kv_shape


def test_shrinking_passes_change_shape_as_slots_commit(engines, monkeypatch):
    """The contrast: the eager CPU path queries fewer entries as the hole fills."""
    engine = engines["shrinking"]
    seen = record_step_shapes(engine, monkeypatch)
    engine.complete(CompletionRequest(prefix=PREFIX, suffix=SUFFIX, span_lengths=(12,),
                                      max_tokens=12, threshold=1.0, stop="free"))
    assert len({shape[0] for shape in seen}) > 1


def count_loop(engine, monkeypatch) -> dict:
    """Ops and host syncs of the denoising loop's passes, counted on the thread that runs them
    (the engine's worker): DispatchCounter only sees its own thread."""
    loop = engine._loop
    real_iterate = loop.iterate
    counted = {"ops": 0, "syncs": 0}

    def iterate():
        with DispatchCounter() as log:
            ended = real_iterate()
        counted["ops"] += log.ops
        counted["syncs"] += log.syncs
        return ended

    monkeypatch.setattr(loop, "iterate", iterate)
    return counted


@pytest.mark.parametrize("every", [1, 3, 5])
def test_the_loop_syncs_with_the_host_once_per_check_interval(engines, monkeypatch, every):
    engine = engines["static"]
    counted = count_loop(engine, monkeypatch)
    monkeypatch.setattr(engine, "check_every", every)
    result = engine.complete(CompletionRequest(prefix=PREFIX, suffix=SUFFIX, span_lengths=(6, 12),
                                               max_tokens=12, threshold=1.0, stop="free"))
    passes = result.stats.forward_passes
    # One read per interval, plus the one transfer of the per-step commit counts at the end.
    assert passes >= 6
    assert counted["syncs"] <= math.ceil(passes / every) + 1


def ops_of_request(engine, counted: dict, steps: int) -> int:
    before = counted["ops"]
    engine.complete(CompletionRequest(
        prefix=PREFIX, suffix=SUFFIX, span_lengths=(16,), max_tokens=16, stop="free",
        sampler="maskgit_plus", steps=steps))
    return counted["ops"] - before


def test_a_static_pass_stays_within_its_aten_op_budget(engines, monkeypatch):
    """Two requests that differ only in their number of passes: the difference is the cost
    of the passes alone (set-up and ranking cancel out; a first request makes both warm)."""
    engine = engines["static"]
    counted = count_loop(engine, monkeypatch)
    layers = engine.args.n_layers
    ops_of_request(engine, counted, 2)
    per_pass = (ops_of_request(engine, counted, 12) - ops_of_request(engine, counted, 4)) / 8
    assert 0 < per_pass <= 20 * layers + 60, per_pass


@pytest.mark.parametrize("sampler,threshold", [("threshold", 0.05), ("threshold", 1.0),
                                               ("maskgit_plus", 0.9)])
def test_static_decoding_is_exact_where_the_cache_is(engines, sampler, threshold):
    """One layer: context K/V depend only on their own tokens, so the static pass (every entry
    re-queried each step) must match the full forward step for step, as the shrinking one does."""
    base = dict(prefix=PREFIX, suffix=SUFFIX, span_lengths=(6, 10), max_tokens=10,
                sampler=sampler, threshold=threshold, stop="free")
    static = engines["one-static"].complete(CompletionRequest(**base))
    full = engines["one-layer"].complete(CompletionRequest(**base, use_cache=False))
    assert [c.text for c in static.candidates] == [c.text for c in full.candidates]
    assert static.stats.tokens_committed_per_step == full.stats.tokens_committed_per_step


def test_refreshing_a_static_request_every_step_is_the_uncached_path(engines):
    base = dict(prefix=PREFIX, suffix=SUFFIX, span_lengths=(4, 7), max_tokens=7, threshold=0.3,
                stop="free")
    refreshed = engines["static"].complete(CompletionRequest(**base, cache_refresh_every=1))
    full = engines["shrinking"].complete(CompletionRequest(**base, use_cache=False))
    assert [c.text for c in refreshed.candidates] == [c.text for c in full.candidates]


def test_static_shapes_reproduce_the_memorized_middles(memorized_model):
    """Exact hole lengths give the memorized middles; the engine's own buckets give the text the
    shrinking path gives (which bucket wins is the ranking's business, not the pass's)."""
    static = Engine.load(str(memorized_model), static_shapes=True)
    shrinking = Engine.load(str(memorized_model))
    try:
        for snippet in SNIPPETS:
            n = len(static.tokenizer.encode(snippet))
            prefix, middle, suffix = split_middle(static.tokenizer, snippet, n // 3, 2 * n // 3)
            span = len(static.tokenizer.encode(middle))
            base = dict(prefix=prefix, suffix=suffix, max_tokens=span + 8, stop="free")
            exact = static.complete(CompletionRequest(**base, span_lengths=(span,)))
            assert exact.text == middle, snippet
            texts = [[c.text for c in engine.complete(CompletionRequest(**base)).candidates]
                     for engine in (static, shrinking)]
            assert texts[0] == texts[1], snippet
    finally:
        static.close()
        shrinking.close()


def test_fused_projections_split_back_to_the_published_matrices():
    model = tiny_model(seed=3)
    state = model.state_dict()
    logical = split_projections(state, model.args)
    assert {"layers.0.attention.wq.weight", "layers.0.feed_forward.w3.weight"} <= set(logical)
    assert "layers.0.attention.wqkv.weight" not in logical
    fused = fuse_projections(dict(logical), model.args.n_layers)
    assert sorted(fused) == sorted(state)
    assert all(torch.equal(fused[k], state[k]) for k in state)


def test_fused_layers_compute_what_separate_projections_do():
    """The fused QKV (with bias) and gate/up matmuls against the textbook block, by hand."""
    model = tiny_model(seed=4)
    layer, args = model.layers[0], model.args
    parts = split_projections(model.state_dict(), args)
    x = torch.randn(2, 7, args.dim)
    with torch.no_grad():
        qkv = layer.attention.wqkv(x)
        q = x @ parts["layers.0.attention.wq.weight"].t() + parts["layers.0.attention.wq.bias"]
        v = x @ parts["layers.0.attention.wv.weight"].t() + parts["layers.0.attention.wv.bias"]
        assert torch.allclose(qkv[..., :q.shape[-1]], q, atol=1e-5)
        assert torch.allclose(qkv[..., -v.shape[-1]:], v, atol=1e-5)
        gate = x @ parts["layers.0.feed_forward.w1.weight"].t()
        up = x @ parts["layers.0.feed_forward.w3.weight"].t()
        down = parts["layers.0.feed_forward.w2.weight"]
        expected = (torch.nn.functional.silu(gate) * up) @ down.t()
        assert torch.allclose(layer.feed_forward(x), expected, atol=1e-5)


@pytest.mark.parametrize("mode,bar", [("int8", 0.999), ("int4", 0.999)])
def test_fast_quantized_kernels_give_the_dequantized_logits(mode, bar):
    """On a CPU the same kernels run (int8 x int8 via _int_mm, tinygemm's CPU twin): they must
    agree with the exact dequantize-then-matmul path they replace."""
    model = quantize_model(tiny_model(seed=5).to(torch.bfloat16), mode)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(6))
    exact = logits_of(model, ids)
    kernels = use_fast_kernels(model)
    expected = {"int8": {"Int8Linear": "int_mm", "QuantizedEmbedding": "int_mm"},
                "int4": {"Int4Linear": "tinygemm", "QuantizedEmbedding": "dequant"}}[mode]
    assert kernels == expected
    assert cosine(logits_of(model, ids), exact) >= bar


def test_fp8_layers_stay_close_to_the_full_precision_logits():
    from engine.model.quantize import Fp8Linear, quantize_fp8_body

    model = tiny_model(seed=7).to(torch.bfloat16)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(8))
    reference = logits_of(model, ids)
    quantized = quantize_fp8_body(copy.deepcopy(model))
    assert isinstance(quantized.layers[0].attention.wqkv, Fp8Linear)
    assert not isinstance(quantized.output_proj, Fp8Linear)  # the head stays in 16 bits
    assert cosine(logits_of(quantized, ids), reference) >= 0.99


def test_a_cpu_pass_cache_hands_out_eager_passes_over_one_shared_arena(engines):
    cache = engines["static"]._passes
    assert cache is not None and not cache.use_graphs
    assert engines["static"].warm_up() == []
    from engine.denoise.kv_arena import common_layouts

    small, large = common_layouts(engines["static"].args)[:2]
    second = cache.get(large)  # sizes the arena (a larger shape later would grow it)
    first = cache.get(small)
    assert isinstance(first, passes.StaticPass) and first is not second and not first.graphed
    # Every shape views the same memory: a row's K/V stay put when the batch's shape changes.
    assert first.arena.k[0].data_ptr() == second.arena.k[0].data_ptr() == \
        cache.arena.k[0].data_ptr()
    assert first.arena.k[0].stride() == second.arena.k[0].stride()
