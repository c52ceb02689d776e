"""Dream's `origin` reference sampler: each masked slot revealed with probability r, Dream's
schedule fraction for this step (1 at the last step), whatever the draw's confidence."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.api import CompletionRequest
from engine.denoise import sampler
from engine.denoise.strategies.base import Drawn, Strategy


class Origin(Strategy):
    name = "origin"

    def __init__(self, request: CompletionRequest, masked: Tensor, steps: int,
                 generator: torch.Generator | None, end_ids: Tensor):
        super().__init__(request, masked, steps, generator, end_ids)
        self.schedule = sampler.dream_schedule(steps)

    def transfer(self, drawn: Drawn, masked: Tensor, step: int,
                 rows: Tensor | None) -> Tensor:
        return sampler.transfer_origin(masked, sampler.dream_reveal_fraction(self.schedule, step),
                                       self.generator)
