"""Context K/V reuse across requests (engine/denoise/context_cache.py, engine/denoise/prefill.py)
and the speculative next context (engine/denoise/speculation.py): issue 13 items 1 and 3."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.api import CompletionRequest
from engine.denoise.context_cache import CachedContext, ContextCache, match
from engine.denoise.fim import build_infill_batch, context_budget, lead_specials
from engine.denoise.kv_arena import Layout, allocate, key_bias, query_ids
from engine.denoise.prefill import context_ids, prefill
from engine.engine import Engine, hole_lengths
from engine.stop import stop_for_cursor
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.memorized import SNIPPETS, split_middle

PREFIX = "import os\n\n\ndef add(a, b):\n    total = a + b\n    return "
SUFFIX = "\n\n\nprint(add(1, 2))\nprint(add(3, 4))\n"


@pytest.fixture(scope="module")
def memorized(memorized_model):
    torch.set_num_threads(1)
    made = {"warm": Engine.load(str(memorized_model)),
            "cold": Engine.load(str(memorized_model), context_reuse=False)}
    yield made
    for engine in made.values():
        engine.close()


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("reuse") / "one", "dream", n_layers=1)
    engine = Engine.load(str(path), concurrent=False)
    yield engine
    engine.close()


def entry_of(lead: list[int], tail: list[int], hole: int = 4, nbytes: int = 0) -> CachedContext:
    n = len(lead) + len(tail)
    k = [torch.zeros(1, n, max(nbytes // 4 // max(n, 1), 1))]
    return CachedContext(lead=torch.tensor(lead), tail=torch.tensor(tail), hole=hole, k=k,
                         v=[torch.zeros_like(k[0])])


def test_the_cache_evicts_least_recently_used_entries_past_its_byte_budget():
    one = entry_of([1, 2, 3], [7, 8], nbytes=400)
    size = one.nbytes
    cache = ContextCache(budget_bytes=2 * size, window=0)
    a, b, c = one, entry_of([4, 5, 6], [7, 8], nbytes=400), entry_of([9, 9, 9], [7, 8],
                                                                     nbytes=400)
    cache.put(a)
    cache.put(b)
    assert cache.plan(torch.tensor([1, 2, 3, 4]), torch.tensor([7, 8]), 0, 3, hole=4)
    cache.put(c)  # over budget: b, the least recently used, goes
    assert cache.entries() == [a, c] and cache.evictions == 1 and cache.nbytes <= 2 * size
    cache.put(entry_of([1] * 50, [2] * 50, nbytes=10 * size))  # bigger than the budget: kept out
    assert cache.entries() == [a, c]


def test_runs_are_found_from_the_start_and_at_offsets():
    old = entry_of([0] + list(range(10, 40)), list(range(100, 130)))
    # Typing at the cursor: the prefix grew by two tokens, the suffix is the same.
    lead = torch.tensor([0] + list(range(10, 40)) + [41, 42])
    plan = match(old, lead, torch.tensor(list(range(100, 130))), 1, query_from=lead.numel() - 1)
    assert plan.edited == 1  # token 41; token 42 is the lead token, queried anyway
    assert plan.reused == 1 + 30 + 30
    # The window slid by three tokens and the hole moved two lines down (suffix starts later).
    lead = torch.tensor([0] + list(range(13, 40)) + [41])
    tail = torch.tensor(list(range(104, 130)))
    plan = match(old, lead, tail, 1, query_from=lead.numel() - 1)
    assert plan.edited == 0 and plan.reused == 1 + 27 + 26
    moved = dict(zip(plan.new_index.tolist(), plan.old_index.tolist(), strict=True))
    assert moved[1] == 4 and moved[lead.numel()] == old.lead.numel() + 4
    # The window keeps the tokens next to the edit out of the reused set.
    wide = match(old, lead, tail, 1, query_from=lead.numel() - 1, window=4)
    assert wide.reused == plan.reused - 8 and wide.edited == 0


def test_after_a_stable_head_the_file_s_run_is_found_whichever_way_its_start_moved():
    """Issue 23: an extra-context block (a stable head), then the file's window. A keystroke
    whose tokens merge with the one before lets the window start a token earlier; the file's
    run must still be found (it was only looked for starting later: the replay's request then
    encoded its whole prefix again)."""
    head, file, tail = list(range(200, 212)), list(range(10, 40)), list(range(100, 130))
    old = entry_of([0] + head + file, tail)
    for lead in ([0] + head + [9] + file + [41],  # one token earlier, one typed
                 [0] + head + file[3:] + [41]):  # three tokens later, one typed
        lead = torch.tensor(lead)
        plan = match(old, lead, torch.tensor(tail), 1, query_from=lead.numel() - 1)
        kept = len(file) - (0 if lead[13] == 9 else 3)
        assert plan.reused == 1 + len(head) + kept + len(tail)
        assert plan.edited == (1 if lead[13] == 9 else 0)
        moved = dict(zip(plan.new_index.tolist(), plan.old_index.tolist(), strict=True))
        first = 1 + len(head) + (1 if lead[13] == 9 else 0)
        assert old.lead[moved[first]] == lead[first]  # each reused token is its own old one


def test_an_entry_for_another_hole_length_or_too_many_changes_is_not_reused():
    old = entry_of([0, 1, 2, 3], [5, 6], hole=8)
    cache = ContextCache(max_changed=2, window=0)
    cache.put(old)
    assert cache.plan(torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6]), 1, 3, hole=8)
    assert cache.plan(torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6]), 1, 3, hole=16) is None
    assert cache.plan(torch.tensor([0, 9, 9, 9, 3]), torch.tensor([5, 6]), 1, 4, hole=8) is None


@pytest.mark.parametrize("edit", ["typed", "slid", "hole moved", "block, window earlier"])
def test_on_one_layer_a_warm_first_pass_is_the_cold_one(one_layer, edit):
    """On one layer a context token's K/V depend only on its own token and position: reused
    keys re-rotated to new positions must equal freshly encoded ones, and the first logits of
    every row too, whatever the edit moved."""
    loaded = one_layer._loaded
    args, model, tok = loaded.args, loaded.model, one_layer.tokenizer
    before = (tok.encode(PREFIX), tok.encode(SUFFIX))
    block = tok.encode("# Compare this snippet from util.py:\n# def helper(x):\n#     return x\n")
    after = {"typed": (tok.encode(PREFIX + "a"), before[1]),
             "slid": (before[0][5:] + tok.encode("x"), before[1]),
             "hole moved": (before[0] + before[1][:3], before[1][3:]),
             # an extra-context block, then the file's window starting a token earlier
             "block, window earlier": (block + before[0][1:] + tok.encode("x"), before[1])}[edit]
    if edit == "block, window earlier":
        before = (block + before[0][2:], before[1])
    lengths = [4, 9, 16]
    cache = ContextCache(max_changed=64)
    n_specials = len(lead_specials(args))

    def first(prefix_ids, suffix_ids, plan):
        batch = build_infill_batch(args, prefix_ids, suffix_ids, lengths)
        layout = Layout.of(batch, args, static=False)
        arena = allocate(args, layout, torch.float32, "cpu")
        key_bias(layout, lengths, arena.bias)
        done = prefill(model, args, batch, arena, query_ids(layout, batch, args.pad_token_id),
                       one_layer._banned_all, plan, context_ids(batch), keep=True)
        return batch, layout, arena, done

    with torch.inference_mode():
        *_, seeded = first(*before, None)
        cache.put(seeded.entry)
        batch = build_infill_batch(args, *after, lengths)
        layout = Layout.of(batch, args, static=False)
        lead, tail = context_ids(batch)
        plan = cache.plan(lead, tail, n_specials, layout.lead, layout.lmax)
        assert plan is not None and plan.reused > 20
        _, _, warm_arena, warm = first(*after, plan)
        _, _, cold_arena, cold = first(*after, None)
        # The cold multi-row request takes its first logits from a pass over its query blocks.
        from engine.denoise.passes import ShrinkingSource, packed_logits

        source = ShrinkingSource(model, args, batch, layout, one_layer._banned_all,
                                 torch.float32)
        masked = batch.hole_valid.clone()
        cold_first = packed_logits(model, one_layer._banned_all,
                                   [source.query(masked, torch.zeros_like(masked), None)])[0]
    used = layout.context_used
    for warm_kv, cold_kv in ((warm_arena.k[0], cold_arena.k[0]),
                             (warm_arena.v[0], cold_arena.v[0])):
        torch.testing.assert_close(warm_kv[:, :, :used], cold_kv[:, :, :used], atol=1e-4,
                                   rtol=1e-4)
    valid = batch.hole_valid
    assert torch.equal(warm.first.argmax(-1)[valid], cold_first.argmax(-1)[valid])
    torch.testing.assert_close(warm.first[valid], cold_first[valid], atol=1e-3, rtol=1e-3)
    assert warm.entry.reuses == 1 and cold.entry.reuses == 0


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_reuse_gives_the_completion_a_cold_request_gives_on_the_memorized_model(memorized,
                                                                              index):
    """Every cut of each snippet, warm from the context one keystroke (token) earlier."""
    warm, cold = memorized["warm"], memorized["cold"]
    tok = warm.tokenizer
    snippet = SNIPPETS[index]
    n = len(tok.encode(snippet))
    reused = memorized_middles = 0
    for start in range(2, n - 3):
        end = min(n, start + 2 + start % 5)
        prefix, middle, suffix = split_middle(tok, snippet, start, end)
        earlier, _, _ = split_middle(tok, snippet, start - 1, end)
        base = dict(suffix=suffix, span_lengths=(end - start,), max_tokens=end - start,
                    stop="free")
        warm._cache.clear()  # one hop from a cold encode (chains are bounded elsewhere)
        warm.complete(CompletionRequest(prefix=earlier, **base))
        hot = warm.complete(CompletionRequest(prefix=prefix, **base))
        assert hot.text == cold.complete(CompletionRequest(prefix=prefix, **base)).text
        memorized_middles += hot.text == middle
        reused += hot.stats.reused_context_tokens > 0
    assert reused == n - 5  # every request was warm
    assert memorized_middles >= (n - 5) // 2  # and the model still knows its snippets


def test_a_chain_of_edits_is_encoded_afresh_every_max_reuses(memorized, monkeypatch):
    """With nothing in the background, the request after a worn entry encodes from scratch
    (tests/engine/test_context_refresh.py: the background refresh that avoids it)."""
    engine = memorized["warm"]
    monkeypatch.setattr(engine, "_speculate", False)  # a speculation would be one more hop
    monkeypatch.setattr(engine, "_refresh_worn", False)
    engine.wait_idle()
    limit = engine._cache.max_reuses
    warm = []
    for k in range(2 * limit + 2):
        result = engine.complete(CompletionRequest(
            prefix=PREFIX + "x" * k, suffix=SUFFIX, span_lengths=(6,), max_tokens=6,
            stop="free"))
        warm.append(result.stats.reused_context_tokens > 0)
    assert warm[0] is False  # nothing cached yet
    cold_at = [k for k, hot in enumerate(warm) if not hot]
    assert cold_at == [0, limit + 1, 2 * limit + 2][:len(cold_at)] and len(cold_at) == 2


def test_a_long_edit_is_encoded_from_scratch_and_reuse_can_be_turned_off(memorized):
    engine = memorized["warm"]
    base = dict(suffix=SUFFIX, span_lengths=(6,), max_tokens=6, stop="free")
    engine.complete(CompletionRequest(prefix=PREFIX, **base))
    far = engine.complete(CompletionRequest(prefix=PREFIX + "y = 1\n" * 40, **base))
    assert far.stats.reused_context_tokens == 0
    near = engine.complete(CompletionRequest(prefix=PREFIX + "y = 1\n" * 40 + "z", **base))
    assert near.stats.reused_context_tokens > 0
    off = memorized["cold"]
    off.complete(CompletionRequest(prefix=PREFIX, **base))
    again = off.complete(CompletionRequest(prefix=PREFIX, **base))
    assert again.stats.reused_context_tokens == 0 and off.context_stats()["entries"] == 0


def test_the_accepted_completion_s_context_is_ready_and_other_typing_drops_it(memorized):
    engine = memorized["warm"]
    cache = engine._cache
    prefix, middle, suffix = split_middle(engine.tokenizer, SNIPPETS[4], 8, 20)
    base = dict(suffix=suffix, max_tokens=8, stop="free")
    shown = engine.complete(CompletionRequest(prefix=prefix, **base))
    assert shown.text
    assert engine.wait_idle()
    assert [e for e in cache.entries() if e.speculative]
    hits = cache.speculative_hits
    accepted = engine.complete(CompletionRequest(prefix=prefix + shown.text, **base))
    assert accepted.stats.speculative_hit and accepted.stats.reused_context_tokens > 0
    assert cache.speculative_hits == hits + 1

    # Shown again, but the user types something else: the speculation is dropped at once.
    assert engine.wait_idle()
    cache.drop_speculative()
    again = engine.complete(CompletionRequest(prefix=prefix + " ", **base))
    assert again.text and engine.wait_idle()
    speculated = [e for e in cache.entries() if e.speculative]
    assert len(speculated) == 1
    drops = cache.speculative_drops
    other = engine.complete(CompletionRequest(prefix=prefix + " q", **base))
    assert not other.stats.speculative_hit
    assert speculated[0] not in cache.entries() and cache.speculative_drops == drops + 1


def cold_context(engine: Engine, request: CompletionRequest):
    """((lead, tail) ids, hole) of `request` as a cold request builds them: one row."""
    args, hole = engine._loaded.args, max(hole_lengths(request))
    budget = context_budget(args, hole, request.max_context_tokens)
    prefix_ids, suffix_ids = engine._context_ids(request.prefix, request.suffix, budget,
                                                 request.extra)
    return context_ids(build_infill_batch(args, prefix_ids, suffix_ids, [hole])), hole


def _automatic(prefix: str, suffix: str) -> CompletionRequest:
    """An editor's automatic request: the stop mode its cursor gives, 32 tokens."""
    stop = stop_for_cursor(prefix.rsplit("\n", 1)[-1], suffix.split("\n", 1)[0])
    return CompletionRequest(prefix=prefix, suffix=suffix, max_tokens=32, stop=stop)


@pytest.mark.parametrize("snippet, cursor", [(0, "def add(a, b):"),
                                             (4, "    result = 0")])
def test_the_speculation_serves_a_next_request_with_another_stop_and_answers_as_cold(
        memorized, snippet, cursor):
    """Issue 22: accepting a `block` completion that ends on a written line makes the next
    automatic request a `line` one (24-slot hole, not 32), and a `line` completion that opens a
    block the reverse. Cached states serve only the hole length they were computed beside, so
    the speculation is made beside the next request's hole (in full: no entry of that length
    to grow from), and that request's answer is the cold one's; the one beside this request's
    hole is made too, for a client whose stop is fixed."""
    warm, cold = memorized["warm"], memorized["cold"]
    text = SNIPPETS[snippet]
    at = text.index(cursor) + len(cursor)
    prefix, suffix = text[:at], text[at:]
    assert warm.wait_idle()
    warm._cache.clear()
    shown = warm.complete(_automatic(prefix, suffix))
    assert shown.text and warm.wait_idle()
    accepted = _automatic(prefix + shown.text, suffix)
    first = _automatic(prefix, suffix)
    assert max(hole_lengths(accepted)) != max(hole_lengths(first)), (first.stop, accepted.stop)
    speculated = sorted(e.hole for e in warm._cache.entries() if e.speculative)
    assert speculated == sorted({max(hole_lengths(first)), max(hole_lengths(accepted))})
    # The one beside the new hole holds the context a cold encode of the accepted request
    # builds, and follows the entry of this request's own context (complete's batch's ids,
    # not rebuilt on the idle queue: they must be a cold build's).
    (lead, tail), hole = cold_context(warm, accepted)
    beside = [e for e in warm._cache.entries() if e.speculative and e.hole == hole]
    assert len(beside) == 1
    assert torch.equal(beside[0].lead, lead) and torch.equal(beside[0].tail, tail)
    own = warm._cache.find(*cold_context(warm, first)[0], max(hole_lengths(first)))
    assert own is not None and beside[0].parent is own
    hits = warm._cache.speculative_hits
    after = warm.complete(accepted)
    assert after.stats.speculative_hit and warm._cache.speculative_hits == hits + 1
    # every token of the prefix and suffix (and a special or so) came from the cache
    assert after.stats.reused_context_tokens > after.stats.prefix_tokens + \
        after.stats.suffix_tokens
    again = cold.complete(accepted)
    assert [c.text for c in after.candidates] == [c.text for c in again.candidates]
    assert after.text == again.text

    # A client whose stop is a fixed setting that agreed with the rule at the first cursor
    # (an HTTP script's `block`) asks for the first hole again: that speculation is there too.
    assert warm.wait_idle()
    warm._cache.clear()
    assert warm.complete(first).text == shown.text and warm.wait_idle()
    fixed = warm.complete(replace(accepted, stop=first.stop))
    assert fixed.stats.speculative_hit


def test_a_request_that_arrives_first_drops_the_speculation_it_would_wait_for(memorized):
    """Speculation only runs when the worker is idle; a pending one is discarded as soon as a
    request arrives (it would only compete with it)."""
    engine = memorized["warm"]
    assert engine.wait_idle()
    ran = []
    worker = engine._worker
    worker.when_idle(lambda: ran.append("late"))  # queued behind nothing: it runs
    assert engine.wait_idle() and ran == ["late"]
    with worker._cond:  # queue a speculation, then a request, before the worker looks
        worker._idle_tasks["speculate"] = lambda: ran.append("speculation")
    engine.complete(CompletionRequest(prefix=PREFIX, suffix=SUFFIX, span_lengths=(4,),
                                      max_tokens=4, stop="free"))
    assert engine.wait_idle() and ran == ["late"]


@pytest.mark.slow
def test_the_paired_replay_times_the_same_requests_warm_and_cold(memorized_model):
    """Issue 21.7: the real-time replay's cold and warm p50s compare different requests, so
    `make bench` pairs them: the requests sent, each on an engine that
    reuses its predecessor's context and on one that never reuses, back to back."""
    from engine.bench.keystroke_replay import paired, replay

    live = Engine.load(str(memorized_model))
    sent: list[CompletionRequest] = []
    try:
        figures = replay(live, chars=24, sent_requests=sent)
    finally:
        live.close()
    assert len(sent) == figures["replay_requests"] >= 3
    assert figures["replay_cold_completed"] + figures["replay_warm_completed"] == \
        figures["replay_completed"]

    warm = Engine.load(str(memorized_model))
    cold = Engine.load(str(memorized_model), context_reuse=False)
    try:
        out = paired(warm, cold, sent)
        assert out["replay_paired_requests"] == len(sent) - 1  # the first has no predecessor
        assert out["replay_paired_warm_rate"] == 1.0  # every later request reused a context
        assert cold.context_stats()["hits"] == 0
        assert warm.context_stats()["hits"] >= len(sent) - 1
        for key in ("cold_ms_p50", "warm_ms_p50", "speedup_p50", "cold_encode_ms_p50",
                    "warm_encode_ms_p50"):
            assert out[f"replay_paired_{key}"] > 0, key
        assert 0.0 <= out["replay_paired_same_text"] <= 1.0
    finally:
        warm.close()
        cold.close()
