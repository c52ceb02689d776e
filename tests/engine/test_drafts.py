"""Engine.complete's drafts on both pass paths (the shrinking eager pass, the CPU default, and
the static fixed-shape pass that CUDA graphs replay): the same step function reports the same
partial fills, each keeping every token the one before had, and asking for drafts changes
nothing in the answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.api import DRAFT_MASK, CompletionRequest

REQUEST = CompletionRequest(prefix="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n",
                            max_tokens=16, stop="free", temperature=0.0)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("drafts"))


def _drafts_and_answers(model: Path, static: bool):
    import torch

    from engine.engine import Engine

    torch.set_num_threads(1)
    engine = Engine.load(str(model), static_shapes=static, context_reuse=False)
    try:
        drafts = []
        streamed = engine.complete(REQUEST, on_draft=drafts.append)
        plain = engine.complete(REQUEST)
    finally:
        engine.close()
    return drafts, streamed, plain


@pytest.mark.parametrize("static", [False, True], ids=["shrinking", "static"])
def test_drafts_follow_the_denoising_and_change_nothing(random_model, static):
    drafts, streamed, plain = _drafts_and_answers(random_model, static)
    assert streamed.text == plain.text and streamed.candidates == plain.candidates
    assert len(drafts) >= 2
    assert [d.step for d in drafts] == sorted({d.step for d in drafts})
    assert drafts[0].masked > drafts[-1].masked
    for before, after in zip(drafts, drafts[1:], strict=False):
        assert after.masked <= before.masked and after.text.startswith(before.text)
    for d in drafts:
        assert d.slots == REQUEST.max_tokens and d.fill.count(DRAFT_MASK) == d.masked


def test_both_paths_show_the_same_drafts(random_model):
    """The host reads differ in interval (a static pass reads every 2 steps), not in what
    they show."""
    shrinking, _, _ = _drafts_and_answers(random_model, False)
    static, _, _ = _drafts_and_answers(random_model, True)
    by_step = {d.step: d for d in shrinking}
    shared = [d for d in static if d.step in by_step]
    assert shared
    for d in shared:
        assert (d.text, d.fill, d.masked) == (by_step[d.step].text, by_step[d.step].fill,
                                              by_step[d.step].masked)
