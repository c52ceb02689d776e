"""One denoising step's commit rule: sample every masked slot, pick which to keep.

`Committer` holds a request's temperatures, schedule length and its sampler's strategy
(engine/denoise/strategies/: one class per sampler); it works on the rows still denoised and
on logits of every slot or of the open ones only. `pad_after_end` applies DreamOn's
pad-to-the-right after a commit. The loop that calls them is engine/denoise/loop.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.api import CompletionRequest
from engine.denoise import sampler
from engine.denoise.passes import SlotLogits
from engine.denoise.strategies import STRATEGIES, Drawn


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
        # All greedy: a plain 0.0 lets the sampler skip the draw (known on the host, no sync).
        # greedy: every row argmax, so its draw does not depend on which other slots get
        # logits and a pass may compute them for the open slots only (passes.SlotLogits).
        self.greedy = not any(t > 0 for t in temperatures)
        self.temperatures: float | Tensor = (
            0.0 if self.greedy else torch.tensor(temperatures, device=masked.device))
        longest = longest or masked.shape[1]
        kind = STRATEGIES[request.sampler]
        self.steps = (request.steps or longest) if kind.uses_steps else longest
        self.strategy = kind(request, masked, self.steps, generator, end_ids)

    def __call__(self, logits: Tensor | SlotLogits, masked: Tensor, step: int,
                 rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """logits (b, Lmax, V) of the batch's `rows` (all B when None), or SlotLogits of some of
        their slots; masked (B, Lmax) -> take (B, Lmax) bool, tokens, p(token); rows not given
        take nothing."""
        open_slots = masked if rows is None else masked[rows]
        drawn = self._draw(logits, open_slots.shape, rows)
        take = self.strategy.transfer(drawn, open_slots, step, rows)
        if rows is None:
            return take, drawn.tokens, drawn.prob
        full_take = torch.zeros_like(masked)
        full_tokens = torch.zeros(masked.shape, dtype=drawn.tokens.dtype, device=masked.device)
        full_prob = torch.zeros(masked.shape, dtype=drawn.prob.dtype, device=masked.device)
        full_take[rows], full_tokens[rows], full_prob[rows] = take, drawn.tokens, drawn.prob
        return full_take, full_tokens, full_prob

    def _draw(self, logits: Tensor | SlotLogits, shape: torch.Size,
              rows: Tensor | None) -> Drawn:
        """Sample, and score each slot for the transfer rule -> (b, Lmax) tensors. Slots with no
        logits (closed ones) get token 0 and score 0: the rules never take a closed slot."""
        temperatures = self.temperatures
        if rows is not None and not self.greedy:
            temperatures = temperatures[rows]
        slots = logits if isinstance(logits, SlotLogits) else None
        values = logits if slots is None else slots.values[None]
        sampled = self.strategy.draw(values, temperatures)
        prob = sampler.token_probability(sampled.probs, sampled.tokens)
        score = self.strategy.score(sampled, prob)
        if slots is None:
            return Drawn(sampled.tokens, prob, score)
        at = (slots.row, slots.slot)
        return Drawn(*(_scattered(part[0], at, shape) for part in (sampled.tokens, prob, score)))


def _scattered(values: Tensor, at: tuple[Tensor, Tensor], shape: torch.Size) -> Tensor:
    out = values.new_zeros(shape)
    out[at] = values
    return out


def pad_after_end(hole: Tensor, valid: Tensor, end_ids: Tensor, mask_id: int, eos_id: int):
    """Still-masked slots right of a row's first end token become EOS -> (hole, forced)."""
    is_end = torch.isin(hole, end_ids) & valid  # (B, Lmax)
    after_end = (torch.cumsum(is_end.int(), dim=1) - is_end.int()) > 0
    forced = after_end & valid & (hole == mask_id)
    return torch.where(forced, torch.full_like(hole, eos_id), hole), forced
