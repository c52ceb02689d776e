"""What every sampler's strategy shares: how it draws, what it ranks by, which slots it keeps.

A `Strategy` is one request's sampler, built once per request by the committer
(engine/denoise/committer.py) and asked once per step. One class per sampler, one file per family,
as sglang's dLLM algorithms are (python/sglang/srt/dllm/algorithm/): the loop never asks which
sampler it runs.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from engine.api import CompletionRequest
from engine.denoise import sampler


class Drawn(NamedTuple):
    """One step's draw per slot: (b, Lmax) each."""

    tokens: Tensor
    prob: Tensor  # p(token) under the distribution it was drawn from
    score: Tensor  # what the strategy's transfer rule ranks by (higher = surer)


class Strategy:
    """One sampler: `draw` samples every slot, `score` ranks them, `transfer` picks which to
    commit -> take (b, Lmax) bool, never a slot that is not masked."""

    name: ClassVar[str]
    # False: the schedule is the longest hole's length, whatever request.steps says (the rule
    # itself decides how many slots a step commits; at least one).
    uses_steps: ClassVar[bool] = True

    def __init__(self, request: CompletionRequest, masked: Tensor, steps: int,
                 generator: torch.Generator | None, end_ids: Tensor):
        self.request, self.steps, self.generator, self.end_ids = request, steps, generator, end_ids

    def draw(self, values: Tensor, temperatures: float | Tensor) -> sampler.Sampled:
        """Dream's draw: /T, top-p, softmax, sample (argmax where T = 0)."""
        return sampler.sample(values, temperature=temperatures, top_p=self.request.top_p,
                              generator=self.generator)

    def score(self, sampled: sampler.Sampled, prob: Tensor) -> Tensor:
        return prob

    def transfer(self, drawn: Drawn, masked: Tensor, step: int,
                 rows: Tensor | None) -> Tensor:
        """masked: the open slots of `rows` (all rows when None) -> the slots to commit."""
        raise NotImplementedError



class DreamScheduled(Strategy):
    """A sampler on Dream's timestep schedule (the reference samplers of Dream's repository)."""

    def __init__(self, request: CompletionRequest, masked: Tensor, steps: int,
                 generator: torch.Generator | None, end_ids: Tensor):
        super().__init__(request, masked, steps, generator, end_ids)
        self.schedule = sampler.dream_schedule(steps)

def content_first(drawn: Drawn, masked: Tensor, end_ids: Tensor) -> Tensor:
    """Slots whose draw is an end token wait while their row still has content slots to fill.

    Without this a weak model commits EOS in the hole's last slot first (it is confident there),
    which makes the slot to its left likelier EOS, and EOS floods the hole right to left: the
    embedded model returned 1005 empty completions of 1033 (docs/LOG.md). LLaDA-1.5 defers EOS
    the same way. Only the fast samplers use it; the reference samplers stay as published."""
    content = masked & ~torch.isin(drawn.tokens, end_ids)  # (B, Lmax)
    return torch.where(content.any(dim=1, keepdim=True), content, masked)
