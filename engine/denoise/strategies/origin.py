"""Dream's `origin` reference sampler: each masked slot revealed with probability r, Dream's
schedule fraction for this step (1 at the last step), whatever the draw's confidence."""

from __future__ import annotations

from torch import Tensor

from engine.denoise import sampler
from engine.denoise.strategies.base import Drawn, DreamScheduled


class Origin(DreamScheduled):
    name = "origin"

    def transfer(self, drawn: Drawn, masked: Tensor, step: int,
                 rows: Tensor | None) -> Tensor:
        return sampler.transfer_origin(masked, sampler.dream_reveal_fraction(self.schedule, step),
                                       self.generator)
