"""Dream's top-k reference samplers: per row, commit the k most confident masked slots, k from
Dream's schedule (floor(remaining * r), all at the last step, >= 1). They differ only in what
"confident" means: p(token) (maskgit_plus), p1 - p2 (topk_margin), -entropy (entropy)."""

from __future__ import annotations

from torch import Tensor

from engine.denoise import sampler
from engine.denoise.strategies.base import Drawn, DreamScheduled


class MaskgitPlus(DreamScheduled):
    name = "maskgit_plus"

    def transfer(self, drawn: Drawn, masked: Tensor, step: int,
                 rows: Tensor | None) -> Tensor:
        k = sampler.dream_transfer_count(masked, self.schedule, step)  # (B,) per row
        return sampler.transfer_top_k(drawn.score, masked, k)


class TopkMargin(MaskgitPlus):
    name = "topk_margin"

    def score(self, sampled: sampler.Sampled, prob: Tensor) -> Tensor:
        return sampler.top2_margin(sampled.probs)


class Entropy(MaskgitPlus):
    name = "entropy"

    def score(self, sampled: sampler.Sampled, prob: Tensor) -> Tensor:
        return sampler.neg_entropy(sampled.probs)
