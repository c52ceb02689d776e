"""LLaDA's reference remasking (`low_confidence`): Gumbel-noised argmax in float64 (no top-p),
then each row commits its fixed quota for this step (n // steps, +1 for the first n % steps),
its most probable masked slots first."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.api import CompletionRequest
from engine.denoise import sampler
from engine.denoise.strategies.base import Drawn, Strategy


class LowConfidence(Strategy):
    name = "low_confidence"

    def __init__(self, request: CompletionRequest, masked: Tensor, steps: int,
                 generator: torch.Generator | None, end_ids: Tensor):
        super().__init__(request, masked, steps, generator, end_ids)
        self.quota = sampler.llada_quota(masked, steps)  # (B, steps)

    def draw(self, values: Tensor, temperatures: float | Tensor) -> sampler.Sampled:
        return sampler.llada_sample(values, temperature=temperatures, generator=self.generator)

    def transfer(self, drawn: Drawn, masked: Tensor, step: int,
                 rows: Tensor | None) -> Tensor:
        quota = self.quota if rows is None else self.quota[rows]
        return sampler.transfer_top_k(drawn.score, masked, quota[:, min(step, self.steps - 1)])
