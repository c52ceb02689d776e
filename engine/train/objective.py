"""Masked-diffusion training loss (MDLM / LLaDA / Dream objective) with FIM-shaped spans.

Per row a noise level t ~ U(eps, 1) is drawn and positions are masked with probability t. The
loss is the cross-entropy on masked slots weighted by 1/t (the ELBO of absorbing-state diffusion,
LLaDA eq. 3), divided by the number of positions that could have been masked: nats per token.

With probability `span_prob` a row is noised the way fill-in-the-middle inference sees it: only
one contiguous "middle" may be masked (still at ratio t inside it), prefix and suffix stay
visible. That is the conditional ELBO of the middle given its context, so 1/t stays correct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_diffusion_loss(
    model,
    ids: Tensor,
    key_valid: Tensor | None,
    *,
    mask_id: int,
    logit_shift: bool,
    generator: torch.Generator | None = None,
    span_prob: float = 0.5,
    eps: float = 1e-3,
    protect: Tensor | None = None,
) -> Tensor:
    """Scalar loss for one batch.

    ids (B, L) clean tokens; key_valid (B, L) bool, False on padding (never attended or masked),
    or None when every position is attended: the model then runs without an attention mask
    (on CUDA that lets SDPA use flash attention with grouped KV heads); protect (B, L) bool,
    positions that are never masked (BOS, trailing EOS, ...). With logit_shift (Dream family)
    slot i is predicted from hidden state i-1, so slot 0 never is.
    """
    if ids.dim() != 2 or (key_valid is not None and key_valid.shape != ids.shape):
        shape = None if key_valid is None else tuple(key_valid.shape)
        raise ValueError(f"ids and key_valid must both be (B, L); got {tuple(ids.shape)}, {shape}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    device = ids.device
    batch, length = ids.shape
    attend_mask = None if key_valid is None else key_valid.to(device=device, dtype=torch.bool)

    maskable = (torch.ones_like(ids, dtype=torch.bool) if attend_mask is None
                else attend_mask.clone())  # (B, L)
    if protect is not None:
        maskable &= ~protect.to(device=device, dtype=torch.bool)
    if logit_shift:
        maskable[:, 0] = False  # nothing predicts slot 0

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    t = eps + (1.0 - eps) * uniform(batch)  # (B,)

    # FIM-shaped rows: a contiguous window [start, end) over the maskable positions.
    is_span_row = uniform(batch) < span_prob  # (B,)
    rank = torch.cumsum(maskable.long(), dim=1) - 1  # (B, L) index among maskable positions
    count = maskable.sum(dim=1)  # (B,)
    span_len = (1 + (uniform(batch) * count).floor().long()).clamp(max=count)  # (B,) in [1, count]
    start = (uniform(batch) * (count - span_len + 1)).floor().long()  # (B,)
    in_span = (rank >= start[:, None]) & (rank < (start + span_len)[:, None])
    candidates = maskable & torch.where(is_span_row[:, None], in_span, torch.ones_like(in_span))

    masked = candidates & (uniform(batch, length) < t[:, None])  # (B, L)
    # At least one target per row that has candidates: force the candidate with the lowest draw.
    draw = torch.where(candidates, uniform(batch, length), torch.full_like(t[:, None], 2.0))
    forced = F.one_hot(draw.argmin(dim=1), length).bool() & candidates
    masked |= forced

    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    positions = torch.arange(length, device=device).expand(batch, length)
    hidden = model(noisy, positions, key_valid=attend_mask)  # (B, L, D)

    if logit_shift:
        target_mask, source_hidden = masked[:, 1:], hidden[:, :-1]
        targets = ids[:, 1:]
    else:
        target_mask, source_hidden = masked, hidden
        targets = ids
    logits = model.output(source_hidden[target_mask])  # (N, V), head only on target rows
    ce = F.cross_entropy(logits.float(), targets[target_mask], reduction="none")  # (N,)
    weight = (1.0 / t)[:, None].expand_as(target_mask)[target_mask]  # (N,)
    n_candidates = candidates.sum().clamp(min=1)
    return (ce * weight).sum() / n_candidates
