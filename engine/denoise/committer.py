"""One denoising step's commit rule: sample every masked slot, pick which to keep.

`Committer` holds a request's sampler settings and schedule; `TRANSFER` maps each sampler name
to its transfer rule. `pad_after_end` applies DreamOn's pad-to-the-right after a commit.
The loop that calls them is engine/denoise/denoiser.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from engine.api import CompletionRequest
from engine.denoise import sampler
from engine.denoise.passes import SlotLogits

DREAM_TOPK_SAMPLERS = ("maskgit_plus", "topk_margin", "entropy")


class Committer:
    """One step's sampling + transfer rule for the request's sampler, per row of the batch."""

    def __init__(
        self,
        request: CompletionRequest,
        masked: Tensor,  # (B, Lmax) the initial masks
        temperatures: list[float],  # per row
        generator: torch.Generator,
        end_ids: Tensor,  # (E,) ids that end a span
        longest: int | None = None,  # the longest real hole (masked may be wider: padding)
    ):
        self.request = request
        self.end_ids = end_ids
        self.name = request.sampler
        # All greedy: a plain 0.0 lets the sampler skip the draw (known on the host, no sync).
        hot = any(t > 0 for t in temperatures)
        self.temperatures = (
            torch.tensor(temperatures, device=masked.device) if hot else 0.0
        )
        self.generator = generator
        longest = longest or masked.shape[1]
        self.steps = longest if self.name in ("threshold", "entropy_bounded") else (
            request.steps or longest
        )
        self.schedule = sampler.dream_schedule(self.steps)
        is_llada = self.name == "low_confidence"
        self.quota = sampler.llada_quota(masked, self.steps) if is_llada else None
        self.rows: Tensor | None = None  # the rows of the current call (None: all)

    @property
    def greedy(self) -> bool:
        """Every row argmax: its draw does not depend on which other slots get logits, so a pass
        may compute logits for the open slots only (engine/passes.SlotLogits)."""
        return not isinstance(self.temperatures, Tensor)

    def __call__(self, logits: Tensor | SlotLogits, masked: Tensor, step: int,
                 rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """logits (b, Lmax, V) of the batch's `rows` (all B when None), or SlotLogits of some of
        their slots; masked (B, Lmax) -> take (B, Lmax) bool, tokens, p(token); rows not given
        take nothing."""
        self.rows = rows
        open_slots = masked if rows is None else masked[rows]
        drawn = self._draw(logits, open_slots.shape)
        take = TRANSFER[self.name](self, drawn, open_slots, step)
        if rows is None:
            return take, drawn.tokens, drawn.prob
        full_take = torch.zeros_like(masked)
        full_tokens = torch.zeros(masked.shape, dtype=drawn.tokens.dtype, device=masked.device)
        full_prob = torch.zeros(masked.shape, dtype=drawn.prob.dtype, device=masked.device)
        full_take[rows], full_tokens[rows], full_prob[rows] = take, drawn.tokens, drawn.prob
        return full_take, full_tokens, full_prob

    def _draw(self, logits: Tensor | SlotLogits, shape: torch.Size) -> Drawn:
        """Sample, and score each slot for the transfer rule -> (b, Lmax) tensors. Slots with no
        logits (closed ones) get token 0 and score 0: the rules never take a closed slot."""
        temperatures = self.temperatures
        if self.rows is not None and isinstance(temperatures, Tensor):
            temperatures = temperatures[self.rows]
        values = logits.values[None] if isinstance(logits, SlotLogits) else logits
        draw = sampler.llada_sample if self.name == "low_confidence" else sampler.sample
        extra = {} if self.name == "low_confidence" else {"top_p": self.request.top_p}
        sampled = draw(values, temperature=temperatures, generator=self.generator, **extra)
        prob = sampler.token_probability(sampled.probs, sampled.tokens)
        score = _slot_score(self.name, sampled, prob)
        if not isinstance(logits, SlotLogits):
            return Drawn(sampled.tokens, prob, score)
        at = (logits.row, logits.slot)
        return Drawn(*(_scattered(part[0], at, shape) for part in (sampled.tokens, prob, score)))


class Drawn(NamedTuple):
    """One step's draw per slot: (b, Lmax) each."""

    tokens: Tensor
    prob: Tensor  # p(token) under the distribution it was drawn from
    score: Tensor  # what the sampler's transfer rule ranks by (higher = surer)


def _scattered(values: Tensor, at: tuple[Tensor, Tensor], shape: torch.Size) -> Tensor:
    out = values.new_zeros(shape)
    out[at] = values
    return out


def _slot_score(name: str, sampled: sampler.Sampled, prob: Tensor) -> Tensor:
    if name in ("topk_margin", "entropy", "entropy_bounded"):
        return sampler.confidence("entropy" if name == "entropy_bounded" else name, sampled)
    return prob


def _content_first(c: Committer, drawn: Drawn, masked: Tensor) -> Tensor:
    """Slots whose draw is an end token wait while their row still has content slots to fill.

    Without this a weak model commits EOS in the hole's last slot first (it is confident there),
    which makes the slot to its left likelier EOS, and EOS floods the hole right to left: the
    embedded model returned 1005 empty completions of 1033 (docs/LOG.md). LLaDA-1.5 defers EOS
    the same way. Only the fast samplers use it; the reference samplers stay as published."""
    content = masked & ~torch.isin(drawn.tokens, c.end_ids)  # (B, Lmax)
    return torch.where(content.any(dim=1, keepdim=True), content, masked)


# One transfer rule per sampler name: (committer, drawn, masked, step) -> take.
def _threshold(c: Committer, drawn: Drawn, masked, step):
    return sampler.transfer_threshold(drawn.score, _content_first(c, drawn, masked),
                                      c.request.threshold)


def _entropy_bounded(c: Committer, drawn: Drawn, masked, step):
    return sampler.transfer_entropy_bounded(drawn.score, _content_first(c, drawn, masked),
                                            c.request.entropy_bound)


def _origin(c: Committer, drawn: Drawn, masked, step):
    return sampler.transfer_origin(masked, sampler.dream_reveal_fraction(c.schedule, step),
                                   c.generator)


def _dream_top_k(c: Committer, drawn: Drawn, masked, step):
    k = sampler.dream_transfer_count(masked, c.schedule, step)  # (B,) per row
    return sampler.transfer_top_k(drawn.score, masked, k)


def _llada_low_confidence(c: Committer, drawn: Drawn, masked, step):
    quota = c.quota if c.rows is None else c.quota[c.rows]
    return sampler.transfer_top_k(drawn.score, masked, quota[:, min(step, c.steps - 1)])


TRANSFER = {
    "threshold": _threshold,
    "entropy_bounded": _entropy_bounded,
    "origin": _origin,
    **dict.fromkeys(DREAM_TOPK_SAMPLERS, _dream_top_k),
    "low_confidence": _llada_low_confidence,
}


def pad_after_end(hole: Tensor, valid: Tensor, end_ids: Tensor, mask_id: int, eos_id: int):
    """Still-masked slots right of a row's first end token become EOS -> (hole, forced)."""
    is_end = torch.isin(hole, end_ids) & valid  # (B, Lmax)
    after_end = (torch.cumsum(is_end.int(), dim=1) - is_end.int()) > 0
    forced = after_end & valid & (hole == mask_id)
    return torch.where(forced, torch.full_like(hole, eos_id), hole), forced
