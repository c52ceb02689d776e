"""One denoising step's commit rule: sample every masked slot, pick which to keep.

`Committer` holds a request's sampler settings and schedule; `TRANSFER` maps each sampler name
to its transfer rule. `pad_after_end` applies DreamOn's pad-to-the-right after a commit.
The loop that calls them is engine/denoiser.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine import sampler
from engine.api import CompletionRequest

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

    def __call__(self, logits: Tensor, masked: Tensor, step: int, rows: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """logits (b, Lmax, V) of the batch's `rows` (all B when None), masked (B, Lmax)
        -> take (B, Lmax) bool, tokens, p(token); rows not given take nothing."""
        self.rows = rows
        open_slots = masked if rows is None else masked[rows]
        temperatures = self.temperatures
        if rows is not None and isinstance(temperatures, Tensor):
            temperatures = temperatures[rows]
        draw = sampler.llada_sample if self.name == "low_confidence" else sampler.sample
        extra = {} if self.name == "low_confidence" else {"top_p": self.request.top_p}
        drawn = draw(logits, temperature=temperatures, generator=self.generator, **extra)
        prob = sampler.token_probability(drawn.probs, drawn.tokens)  # (b, Lmax)
        take = TRANSFER[self.name](self, drawn, prob, open_slots, step)
        if rows is None:
            return take, drawn.tokens, prob
        full_take = torch.zeros_like(masked)
        full_tokens = torch.zeros(masked.shape, dtype=drawn.tokens.dtype, device=masked.device)
        full_prob = torch.zeros(masked.shape, dtype=prob.dtype, device=masked.device)
        full_take[rows], full_tokens[rows], full_prob[rows] = take, drawn.tokens, prob
        return full_take, full_tokens, full_prob


def _content_first(c: Committer, drawn, masked: Tensor) -> Tensor:
    """Slots whose draw is an end token wait while their row still has content slots to fill.

    Without this a weak model commits EOS in the hole's last slot first (it is confident there),
    which makes the slot to its left likelier EOS, and EOS floods the hole right to left: the
    embedded model returned 1005 empty completions of 1033 (docs/LOG.md). LLaDA-1.5 defers EOS
    the same way. Only the fast samplers use it; the reference samplers stay as published."""
    content = masked & ~torch.isin(drawn.tokens, c.end_ids)  # (B, Lmax)
    return torch.where(content.any(dim=1, keepdim=True), content, masked)


# One transfer rule per sampler name: (committer, drawn, p(token), masked, step) -> take.
def _threshold(c: Committer, drawn, prob, masked, step):
    return sampler.transfer_threshold(prob, _content_first(c, drawn, masked), c.request.threshold)


def _entropy_bounded(c: Committer, drawn, prob, masked, step):
    return sampler.transfer_entropy_bounded(
        sampler.neg_entropy(drawn.probs), _content_first(c, drawn, masked),
        c.request.entropy_bound)


def _origin(c: Committer, drawn, prob, masked, step):
    return sampler.transfer_origin(masked, sampler.dream_reveal_fraction(c.schedule, step),
                                   c.generator)


def _dream_top_k(c: Committer, drawn, prob, masked, step):
    k = sampler.dream_transfer_count(masked, c.schedule, step)  # (B,) per row
    return sampler.transfer_top_k(sampler.confidence(c.name, drawn), masked, k)


def _llada_low_confidence(c: Committer, drawn, prob, masked, step):
    quota = c.quota if c.rows is None else c.quota[c.rows]
    return sampler.transfer_top_k(prob, masked, quota[:, min(step, c.steps - 1)])


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
