"""The denoising loop and the Engine facade on tiny random checkpoints (structure, not quality)."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.api import CompletionRequest, EngineError
from engine.denoise.committer import pad_after_end
from engine.engine import Engine, hole_lengths
from tests.fixtures.checkpoints import make_tiny_checkpoint

ALL_SAMPLERS = ("threshold", "entropy_bounded", "origin", "maskgit_plus", "topk_margin",
                "entropy", "low_confidence")
PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One random engine per layout, loaded through the normal path."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("random")
    made = {
        variant: Engine.load(str(make_tiny_checkpoint(root / variant, variant)))
        for variant in ("dream", "open-dcoder", "llada", "dreamon")
    }
    # One layer: the context K/V depend only on the context's own embeddings, so the dual cache
    # is exact there and cached decoding must match the full forward step for step.
    made["one-layer"] = Engine.load(str(make_tiny_checkpoint(root / "one", "dream", n_layers=1)))
    yield made
    for engine in made.values():
        engine.close()


def test_pad_after_end_fills_masks_right_of_the_first_end_token_only():
    mask, eos = 9, 8
    hole = torch.tensor([[1, eos, mask, 3, mask], [mask, 2, mask, mask, mask]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, forced = pad_after_end(hole, valid, torch.tensor([eos]), mask, eos)
    assert out.tolist() == [[1, eos, eos, 3, eos], [mask, 2, mask, mask, mask]]
    assert forced.tolist() == [[False, False, True, False, True], [False] * 5]


@pytest.mark.parametrize("variant", ["dream", "open-dcoder", "llada"])
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_every_sampler_fills_every_slot_on_every_layout(engines, variant, sampler):
    engine = engines[variant]
    request = CompletionRequest(prefix=PREFIX, suffix=SUFFIX, span_lengths=(5, 12), max_tokens=12,
                                sampler=sampler, stop="free", seed=0)
    result = engine.complete(request)
    stats = result.stats
    assert not stats.cancelled and not stats.timed_out
    # The chosen row resolved each of its slots exactly once, over at most one step per pass.
    assert stats.committed_tokens == stats.span_length
    assert len(stats.tokens_committed_per_step) == stats.forward_passes
    assert stats.forward_passes <= 12
    assert result.candidates and result.text == result.candidates[0].text
    assert set(stats.timings_ms) >= {"tokenize", "encode", "denoise", "decode", "total"}


def test_threshold_one_commits_one_per_step_and_low_threshold_commits_all_at_once(engines):
    engine = engines["dream"]
    base = dict(prefix=PREFIX, suffix=SUFFIX, span_lengths=(8,), max_tokens=8, stop="free")
    slow = engine.complete(CompletionRequest(**base, threshold=1.0))
    assert slow.stats.tokens_committed_per_step[0] == 1
    fast = engine.complete(CompletionRequest(**base, threshold=1e-9))
    assert fast.stats.forward_passes == 1 and fast.stats.tokens_committed_per_step == [8]


def test_reference_samplers_follow_the_step_budget(engines):
    engine = engines["dream"]
    for sampler in ("maskgit_plus", "low_confidence", "origin"):
        result = engine.complete(CompletionRequest(
            prefix=PREFIX, suffix=SUFFIX, span_lengths=(8,), max_tokens=8, sampler=sampler,
            steps=2, stop="free", seed=1))
        assert result.stats.forward_passes <= 2
        assert result.stats.committed_tokens == 8


def test_cached_and_uncached_decoding_agree_where_the_cache_is_exact(engines):
    engine = engines["one-layer"]
    # threshold 1.0 commits one slot a step: most steps then query a few open slots against
    # frozen committed ones, which one layer must reproduce exactly too.
    for sampler, threshold in (("threshold", 0.05), ("threshold", 1.0), ("maskgit_plus", 0.9)):
        base = dict(prefix=PREFIX, suffix=SUFFIX, span_lengths=(6, 10), max_tokens=10,
                    sampler=sampler, threshold=threshold, stop="free")
        cached = engine.complete(CompletionRequest(**base))
        full = engine.complete(CompletionRequest(**base, use_cache=False))
        assert [c.text for c in cached.candidates] == [c.text for c in full.candidates]
        assert cached.stats.tokens_committed_per_step == full.stats.tokens_committed_per_step


def test_one_encode_gives_every_bucket_row_its_own_context_keys(engines, monkeypatch):
    """On one layer a context key depends only on its token and position, so the keys shared
    from the longest row (suffix re-rotated by the length difference) must equal each row's
    own encode exactly, and the batch encodes once."""
    from engine.denoise import fim
    from engine.denoise.kv_arena import Layout, allocate, encode_shared, key_bias

    engine = engines["one-layer"]
    loaded = engine._loaded
    model, args = loaded.model, loaded.args
    prefix_ids = engine.tokenizer.encode(PREFIX)
    suffix_ids = engine.tokenizer.encode(SUFFIX)
    lengths = [4, 9, 16]
    batch = fim.build_infill_batch(args, prefix_ids, suffix_ids, lengths)
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    with torch.inference_mode():
        layout = Layout.of(batch, args, static=False)
        arena = allocate(args, layout, torch.float32, "cpu")
        key_bias(layout, lengths, arena.bias)
        encode_shared(model, args, batch, arena)
        assert len(calls) == 1
        lead, used = layout.lead, layout.context_used
        for r, n in enumerate(lengths):
            one = slice(r, r + 1)
            _, own = encode(batch.ids[one], batch.positions[one], key_valid=batch.key_valid[one])
            width = int(batch.key_valid[r].sum())
            for shared, mine in ((arena.k[0][r], own.k[0][0]), (arena.v[0][r], own.v[0][0])):
                torch.testing.assert_close(shared[:, :lead], mine[:, :lead])
                torch.testing.assert_close(shared[:, lead:used],
                                           mine[:, batch.hole_start + n:width])
    # Each row attends to the context, the lead and its own hole slots, nothing else.
    attended = arena.bias[:, 0, 0] == 0
    c = layout.context
    for r, n in enumerate(lengths):
        assert attended[r, :used].all() and not attended[r, used:c].any()
        assert attended[r, c:c + 1 + n].all() and not attended[r, c + 1 + n:].any()


def test_a_step_queries_open_slots_their_predictors_and_changed_slots_only():
    from engine.denoise.kv_arena import plan_queries

    masked = torch.tensor([[False, True, True, False, False], [True, False, False, False, False]])
    stale = torch.tensor([[True, False, False, False, False], [False, False, True, False, False]])
    hole_valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    plan = plan_queries(masked, stale, hole_valid, shift=1)
    # Query-block entries: slot j is entry j + 1 and is predicted by entry j (the lead is 0).
    # Row 0: slot 0 changed (1), slots 1-2 open (2, 3) with predictors 1, 2. Row 1: slot 0 open
    # (1) with the lead token (0) predicting it, slot 2 changed (3).
    rows = [o[v].tolist() for o, v in zip(plan.offsets, plan.valid, strict=True)]
    assert rows == [[1, 2, 3], [0, 1, 3]]
    assert plan.offsets.shape[1] == 3  # no wider than the row that wants the most
    for r, j in ((0, 1), (0, 2), (1, 0)):
        assert plan.offsets[r, plan.predictor[r, j]] == j
    unshifted = plan_queries(masked, stale, hole_valid, shift=0)
    assert [o[v].tolist() for o, v in zip(unshifted.offsets, unshifted.valid, strict=True)] == [
        [0, 1, 2], [0, 2]]


def test_refreshing_every_step_is_the_uncached_path(engines):
    engine = engines["dream"]
    base = dict(prefix=PREFIX, suffix=SUFFIX, span_lengths=(7,), max_tokens=7, threshold=0.3,
                stop="free")
    refreshed = engine.complete(CompletionRequest(**base, cache_refresh_every=1))
    full = engine.complete(CompletionRequest(**base, use_cache=False))
    assert refreshed.text == full.text
    assert refreshed.stats.tokens_committed_per_step == full.stats.tokens_committed_per_step


def test_seeded_sampling_repeats_and_candidates_are_distinct(engines):
    engine = engines["dream"]
    base = dict(prefix=PREFIX, suffix=SUFFIX, span_lengths=(8,), max_tokens=8, temperature=1.0,
                stop="free")
    a = engine.complete(CompletionRequest(**base, seed=11))
    b = engine.complete(CompletionRequest(**base, seed=11))
    assert a.text == b.text
    assert a.stats.tokens_committed_per_step == b.stats.tokens_committed_per_step
    many = engine.complete(CompletionRequest(**base, seed=3, num_candidates=4))
    texts = [c.text for c in many.candidates]
    assert len(texts) == len(set(texts)) and 1 <= len(texts) <= 4
    confidences = [(c.ended, c.mean_confidence) for c in many.candidates]
    assert confidences == sorted(confidences, reverse=True)  # best first


def test_unknown_length_uses_buckets_in_one_batch(engines):
    engine = engines["dream"]
    result = engine.complete(CompletionRequest(prefix=PREFIX, suffix=SUFFIX, max_tokens=40))
    assert result.stats.span_length in hole_lengths(CompletionRequest(prefix="", suffix="",
                                                                      max_tokens=40))
    assert hole_lengths(CompletionRequest(prefix="", suffix="", max_tokens=40)) == [8, 16, 32, 40]
    assert hole_lengths(CompletionRequest(prefix="", suffix="", max_tokens=64, stop="line")) == [
        8, 16, 24]
    assert hole_lengths(CompletionRequest(prefix="", suffix="", max_tokens=5)) == [5]


def test_dreamon_expands_and_deletes_within_its_budget(engines):
    engine = engines["dreamon"]
    assert engine.args.variant == "dreamon" and engine.args.expand_token_id is not None
    result = engine.complete(CompletionRequest(
        prefix=PREFIX, suffix=SUFFIX, span_lengths=(4,), max_tokens=12, temperature=0.5, seed=2,
        stop="free"))
    stats = result.stats
    assert 0 <= stats.span_length <= 12  # the hole never outgrows max_tokens
    assert stats.forward_passes == len(stats.tokens_committed_per_step)
    assert not stats.cancelled


def test_empty_context_and_a_context_longer_than_the_window(engines):
    engine = engines["dream"]
    empty = engine.complete(CompletionRequest(prefix="", suffix="", span_lengths=(4,),
                                              max_tokens=4, stop="free"))
    assert empty.stats.prefix_tokens == 0 and empty.stats.suffix_tokens == 0
    huge = engine.complete(CompletionRequest(prefix="x = 1\n" * 5000, suffix="y = 2\n" * 5000,
                                             span_lengths=(4,), max_tokens=4,
                                             max_context_tokens=200))
    assert huge.stats.prefix_tokens + huge.stats.suffix_tokens <= 200 - 2 - 4
    assert huge.stats.prefix_tokens > huge.stats.suffix_tokens  # about 3:1


def test_cancel_before_start_and_a_deadline_already_passed(engines):
    engine = engines["dream"]
    event = threading.Event()
    event.set()
    base = dict(prefix=PREFIX, suffix=SUFFIX, span_lengths=(16,), max_tokens=16, threshold=1.0)
    cancelled = engine.complete(CompletionRequest(**base), cancel=event)
    assert cancelled.stats.cancelled and cancelled.text == "" and cancelled.candidates == []
    assert cancelled.stats.forward_passes == 0
    timed = engine.complete(CompletionRequest(**base, timeout_ms=1e-6))
    # Past its deadline on arrival: answered before the model runs it (issue 20).
    assert timed.stats.timed_out and timed.stats.forward_passes == 0


@pytest.mark.parametrize("bad", [
    dict(max_tokens=-1), dict(max_tokens=0), dict(max_tokens=10**6), dict(span_lengths=()),
    dict(span_lengths=(0,)), dict(span_lengths=(99,), max_tokens=8), dict(stop="word"),
    dict(sampler="beam"), dict(threshold=0.0), dict(threshold=1.5), dict(temperature=-1.0),
    dict(top_p=0.0), dict(num_candidates=0), dict(steps=0), dict(cache_refresh_every=-1),
    dict(timeout_ms=0), dict(max_context_tokens=4, max_tokens=8), dict(temperature=float("nan")),
    dict(prefix=None), dict(seed="x"), dict(max_context_tokens=9, max_tokens=8),
])
def test_nonsense_requests_get_one_line_engine_errors(engines, bad):
    fields = dict(prefix="a", suffix="b") | bad
    with pytest.raises(EngineError) as err:
        engines["dream"].complete(CompletionRequest(**fields))
    assert "\n" not in str(err.value) and str(err.value).startswith("bad completion request")


def test_closed_engine_refuses_work_and_info_reports_the_model(tmp_path):
    engine = Engine.load(str(make_tiny_checkpoint(tmp_path / "m", "dream")))
    info = engine.info()
    assert info.family == "dream" and info.parameters > 0 and info.weight_bytes >= info.parameters
    assert info.max_context == engine.args.max_context and info.quant == "none"
    engine.close()
    with pytest.raises(EngineError):
        engine.complete(CompletionRequest(prefix="", suffix=""))


def test_bad_load_options_are_engine_errors(tmp_path):
    path = str(make_tiny_checkpoint(tmp_path / "m", "dream"))
    with pytest.raises(EngineError):
        Engine.load(path, quant="int3")
    with pytest.raises(EngineError):
        Engine.load(path, dtype="float8")


def test_text_that_cannot_be_tokenized_is_an_engine_error(engines):
    with pytest.raises(EngineError, match="cannot be tokenized"):
        engines["dream"].complete(CompletionRequest(prefix="a\ud800", suffix=""))


class ScriptedLogits:
    """A stand-in model for the DreamOn loop's bookkeeping: each forward pass returns logits
    that make one chosen slot certain (and every other slot uniform, i.e. maximal entropy), so
    the test controls which slot is committed with which token, step by step."""

    def __init__(self, vocab: int, script: list[tuple[int, int]]):
        self.vocab, self.script, self.calls, self.lengths = vocab, script, 0, []

    def forward(self, seq, positions):
        return torch.zeros(seq.shape[0], seq.shape[1], 1)

    def output(self, hidden):
        n = hidden.shape[1]
        self.lengths.append(n)
        slot, token = self.script[self.calls]
        self.calls += 1
        logits = torch.zeros(1, n, self.vocab)
        logits[0, slot, token] = 50.0
        return logits


def test_dreamon_loop_expands_commits_and_deletes_as_scripted():
    from types import SimpleNamespace

    from engine.denoise.dreamon import denoise_expanding
    from engine.denoise.loop import StopSignal

    eos, mask, expand = 5, 6, 7
    args = SimpleNamespace(expand_token_id=expand, mask_token_id=mask)
    # EXPAND at slot 0 (2 -> 3 slots), token 1 at slot 0, token 2 at slot 1, EOS at slot 2
    # (deleted: it filled a slot that was MASK, so the hole shrinks back to 2).
    model = ScriptedLogits(8, [(0, expand), (0, 1), (1, 2), (2, eos)])
    done = denoise_expanding(
        model, args, [0, 3], [4], CompletionRequest(prefix="", suffix="", max_tokens=8),
        initial_length=2, window=64, temperature=0.0, generator=torch.Generator(),
        stop=StopSignal(), device=torch.device("cpu"), end_ids={eos},
        banned_ids=torch.empty(0, dtype=torch.long),
    )
    assert done.hole.tolist() == [[1, 2]]
    assert model.lengths == [2, 3, 3, 3]  # the hole grew after the first step
    assert done.forward_passes == 4 and done.commits == [[1, 1, 1, 1]]
    assert not done.forced.any()


def test_dreamon_loop_refuses_expansion_once_the_budget_is_spent():
    from types import SimpleNamespace

    from engine.denoise.dreamon import denoise_expanding
    from engine.denoise.loop import StopSignal

    eos, mask, expand = 5, 6, 7
    args = SimpleNamespace(expand_token_id=expand, mask_token_id=mask)
    # The script keeps asking for EXPAND at slot 0. The canvas may hold lead + max_tokens + tail
    # = 5 tokens, so one expansion fits; after it EXPAND is forbidden and the slot's next best
    # token (uniform -> id 0) is taken.
    model = ScriptedLogits(8, [(0, expand)] * 4)
    done = denoise_expanding(
        model, args, [0, 3], [4], CompletionRequest(prefix="", suffix="", max_tokens=2),
        initial_length=1, window=64, temperature=0.0, generator=torch.Generator(),
        stop=StopSignal(), device=torch.device("cpu"), end_ids={eos},
        banned_ids=torch.empty(0, dtype=torch.long),
    )
    assert model.lengths == [1, 2, 2]
    assert done.hole.tolist() == [[0, 0]]


def test_a_small_cpu_model_runs_single_threaded_unless_told_otherwise(engines, monkeypatch):
    engine = engines["dream"]
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MASKFILL_CPU_THREADS", raising=False)
        assert engine.use_cpu_threads() == 1
        monkeypatch.setenv("MASKFILL_CPU_THREADS", "2")
        assert engine.use_cpu_threads() == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
