"""EB-Sampler: the lowest-entropy slots first while their summed entropy stays within gamma
(request.entropy_bound), at least one per row; end tokens wait for the content."""

from __future__ import annotations

from torch import Tensor

from engine.denoise import sampler
from engine.denoise.strategies.base import Drawn, Strategy, content_first


class EntropyBounded(Strategy):
    name = "entropy_bounded"
    uses_steps = False

    def score(self, sampled: sampler.Sampled, prob: Tensor) -> Tensor:
        return sampler.neg_entropy(sampled.probs)

    def transfer(self, drawn: Drawn, masked: Tensor, step: int,
                 rows: Tensor | None) -> Tensor:
        return sampler.transfer_entropy_bounded(
            drawn.score, content_first(drawn, masked, self.end_ids), self.request.entropy_bound)
