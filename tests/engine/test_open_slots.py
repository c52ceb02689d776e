"""A greedy pass computes logits for the still-masked slots only (engine/passes.SlotLogits):
the same logits and the same commits as the dense pass."""

from __future__ import annotations

import pytest
import torch

from engine.api import CompletionRequest
from engine.denoise.committer import Committer
from engine.denoise.fim import build_infill_batch
from engine.denoise.kv_arena import Layout
from engine.denoise.passes import ShrinkingSource, SlotLogits, packed_logits
from engine.engine import Engine
from tests.fixtures.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("open") / "m", "dream", n_layers=2)
    made = Engine.load(str(path), concurrent=False)
    yield made
    made.close()


def _sources(engine, lengths):
    model, args, banned = engine._loaded.model, engine._loaded.args, engine._banned_all
    tok = engine.tokenizer
    prefix, suffix = tok.encode("def area(r):\n    return "), tok.encode("\n\nprint(area(2))\n")
    batch = build_infill_batch(args, prefix, suffix, lengths)
    layout = Layout.of(batch, args, static=False)
    return [ShrinkingSource(model, args, batch, layout, banned, torch.float32)
            for _ in range(2)], batch


@torch.inference_mode()
def test_open_slot_logits_equal_the_dense_logits_at_those_slots(engine):
    (sparse, dense), batch = _sources(engine, [6, 4])
    masked = batch.hole_valid.clone()
    masked[0, :2] = False  # committed slots: no logits needed
    masked[1, 3] = False
    stale = torch.zeros_like(masked)
    stale[0, :2] = True
    queries = [sparse.query(masked, stale.clone(), None, open_only=True),
               dense.query(masked, stale.clone(), None)]
    # Both requests in ONE packed pass, as the loop runs them.
    got, full = packed_logits(engine._loaded.model, engine._banned_all, queries)
    assert isinstance(got, SlotLogits)
    assert torch.equal(torch.stack((got.row, got.slot), 1), masked.nonzero())
    torch.testing.assert_close(got.values, full[got.row, got.slot], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["maskgit_plus", "topk_margin", "entropy", "threshold",
                                  "entropy_bounded"])
@torch.inference_mode()
def test_greedy_commits_from_open_slot_logits_equal_the_dense_commits(engine, name):
    (sparse, dense), batch = _sources(engine, [6, 6])
    masked = batch.hole_valid.clone()
    masked[:, 0] = False
    stale = torch.zeros_like(masked)
    got, full = packed_logits(engine._loaded.model, engine._banned_all,
                              [sparse.query(masked, stale.clone(), None, open_only=True),
                               dense.query(masked, stale.clone(), None)])
    request = CompletionRequest(prefix="", suffix="", span_lengths=(6, 6), max_tokens=6,
                                sampler=name, steps=3, threshold=0.0)
    end_ids = torch.tensor([engine._loaded.args.eos_token_id])

    def commit(logits):
        committer = Committer(request, masked, [0.0, 0.0], torch.Generator().manual_seed(0),
                              end_ids)
        assert committer.greedy
        return committer(logits, masked, step=1)

    take, tokens, prob = commit(got)
    want_take, want_tokens, want_prob = commit(full)
    assert take.any() and torch.equal(take, want_take)
    assert torch.equal(tokens[take], want_tokens[take])
    torch.testing.assert_close(prob[take], want_prob[take])
