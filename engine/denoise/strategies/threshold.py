"""Fast-dLLM's threshold rule (the default sampler): every masked slot whose p(token) reaches
tau, and at least the best one per row; end tokens wait for the content (base.content_first)."""

from __future__ import annotations

from torch import Tensor

from engine.denoise import sampler
from engine.denoise.strategies.base import Drawn, Strategy, content_first


class Threshold(Strategy):
    name = "threshold"
    uses_steps = False

    def transfer(self, drawn: Drawn, masked: Tensor, step: int,
                 rows: Tensor | None) -> Tensor:
        return sampler.transfer_threshold(drawn.score, content_first(drawn, masked, self.end_ids),
                                          self.request.threshold)
