"""One strategy per sampler name (engine/api.SamplerName), one file per family."""

from __future__ import annotations

from engine.denoise.strategies.base import Drawn, Strategy
from engine.denoise.strategies.dream_top_k import Entropy, MaskgitPlus, TopkMargin
from engine.denoise.strategies.entropy_bounded import EntropyBounded
from engine.denoise.strategies.low_confidence import LowConfidence
from engine.denoise.strategies.origin import Origin
from engine.denoise.strategies.threshold import Threshold

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (Threshold, EntropyBounded, Origin, MaskgitPlus, TopkMargin, Entropy,
                        LowConfidence)}

__all__ = ["STRATEGIES", "Drawn", "Strategy"]
