"""Pure sampler math for masked diffusion: draw tokens, score them, decide which slots to commit.

Everything works on a batch of hole slots: logits (B, n, V), masked (B, n) bool (True = still a
MASK and part of this row's hole). A transfer strategy has one shape,
`transfer(conf, masked, ...) -> take` (B, n) bool, and never selects a slot that is not masked.
Counts are per row (models.md §6.1: the reference's batch-average count overwrites real tokens in
rows with fewer masks).

No host syncs: no .item(), nonzero() or int(tensor); schedules come from Python step indices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


class Sampled(NamedTuple):
    tokens: Tensor  # (B, n) long
    probs: Tensor  # (B, n, V) float32, the distribution the tokens were drawn from


def _as_row_tensor(value: float | Tensor, batch: int, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(batch)
    return torch.full((batch,), float(value), device=device)


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always the best)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before > top_p  # Dream: drop once the tokens before already exceed p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def sample(
    logits: Tensor,
    *,
    temperature: float | Tensor = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Sampled:
    """Dream's `sample_tokens`: /T, top-p, top-k, softmax, draw (T > 0) or argmax (T = 0).

    temperature may be a float or a (B,) tensor (one per row: greedy rows beside sampled ones).
    A plain 0.0 skips the draw altogether.
    """
    batch, n, vocab = logits.shape
    if not isinstance(temperature, Tensor) and temperature <= 0:  # greedy: nothing to scale
        probs = torch.softmax(filter_top_k(filter_top_p(logits.float(), top_p), top_k), dim=-1)
        return Sampled(probs.argmax(dim=-1), probs)
    temp = _as_row_tensor(temperature, batch, logits.device)  # (B,)
    hot = temp > 0
    scaled = logits.float() / torch.where(hot, temp, torch.ones_like(temp))[:, None, None]
    scaled = filter_top_k(filter_top_p(scaled, top_p), top_k)
    probs = torch.softmax(scaled, dim=-1)  # (B, n, V)
    greedy = probs.argmax(dim=-1)  # (B, n)
    drawn = torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).reshape(batch, n)
    tokens = torch.where(hot[:, None], drawn, greedy)
    return Sampled(tokens, probs)


def llada_sample(
    logits: Tensor,
    *,
    temperature: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> Sampled:
    """LLaDA's `add_gumbel_noise`: argmax(exp(l) / (-log U)^T) with U ~ U(0, 1) in float64.

    float64 because low-precision Gumbel noise visibly hurts generation quality (LLaDA README).
    Done in log space (l - T log(-log U)): the same argmax without overflowing exp. T = 0 rows
    get no noise, i.e. argmax. probs = softmax(logits); LLaDA's confidence is p(token) under it.
    temperature may be a float or a (B,) tensor.
    """
    lg = logits.double()
    batch = lg.shape[0]
    temp = _as_row_tensor(temperature, batch, lg.device).double()[:, None, None]  # (B, 1, 1)
    u = torch.rand(lg.shape, generator=generator, device=lg.device, dtype=torch.float64)
    noise = torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    tokens = (lg - temp * noise).argmax(dim=-1)
    probs = torch.softmax(lg, dim=-1).float()
    return Sampled(tokens, probs)


# ---- confidences: higher = surer; all (B, n) float32 ---------------------------------------------


def token_probability(probs: Tensor, tokens: Tensor) -> Tensor:
    """maskgit_plus: p(chosen token)."""
    return probs.gather(-1, tokens[..., None]).squeeze(-1)


def top2_margin(probs: Tensor) -> Tensor:
    """topk_margin: p1 - p2."""
    top2 = torch.topk(probs, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def neg_entropy(probs: Tensor) -> Tensor:
    """entropy: sum p log p (= -H, so that higher is surer)."""
    return (probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)


# ---- transfer rules: (conf, masked, ...) -> take (B, n) bool (engine/denoise/strategies/ picks) --


def _rank_descending(score: Tensor) -> Tensor:
    """rank[b, i] = position of slot i when row b is sorted by score, best first (0-based)."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    arange = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, arange)


def transfer_top_k(
    conf: Tensor,
    masked: Tensor,
    k: Tensor,
    *,
    alg_temp: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Commit the k[b] most confident masked slots of each row (k (B,) long, per row).

    alg_temp > 0: choose k slots without replacement from softmax(conf / alg_temp) (Dream's
    multinomial), done as Gumbel-top-k so that every row can have its own k.
    """
    score = conf.float().masked_fill(~masked, NEG_INF)
    if alg_temp > 0:
        u = torch.rand(score.shape, generator=generator, device=score.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
        score = (score / alg_temp + gumbel).masked_fill(~masked, NEG_INF)
    k = torch.minimum(k, masked.sum(dim=-1))  # never more than the row's masks
    return masked & (_rank_descending(score) < k[:, None])


def best_per_row(conf: Tensor, masked: Tensor) -> Tensor:
    """The single most confident masked slot of each row that still has one."""
    ones = torch.ones(conf.shape[0], dtype=torch.long, device=conf.device)
    return transfer_top_k(conf, masked, ones)


def transfer_threshold(conf: Tensor, masked: Tensor, tau: float) -> Tensor:
    """Fast-dLLM: every masked slot with confidence >= tau, and at least the best one per row."""
    return (masked & (conf >= tau)) | best_per_row(conf, masked)


def transfer_entropy_bounded(neg_ent: Tensor, masked: Tensor, gamma: float) -> Tensor:
    """EB-Sampler: lowest-entropy slots first while their summed entropy stays <= gamma (>= 1)."""
    entropy = (-neg_ent.float()).clamp_min(0.0).masked_fill(~masked, float("inf"))
    sorted_ent, order = torch.sort(entropy, dim=-1)
    within = torch.cumsum(sorted_ent.masked_fill(sorted_ent.isinf(), 0.0), dim=-1) <= gamma
    take_sorted = within & sorted_ent.isfinite()
    take = torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)
    return (take & masked) | best_per_row(neg_ent, masked)


def dream_schedule(steps: int, eps: float = 1e-3) -> list[float]:
    """Dream's timesteps t = linspace(1, eps, steps + 1), as host floats (no syncs later)."""
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float64).tolist()


def dream_reveal_fraction(schedule: list[float], step: int) -> float:
    """r = 1 - t[i+1] / t[i]: the fraction of remaining masks to reveal at step i (1 at the end)."""
    if step >= len(schedule) - 2:
        return 1.0
    return 1.0 - schedule[step + 1] / schedule[step]


def dream_transfer_count(masked: Tensor, schedule: list[float], step: int) -> Tensor:
    """Per-row k = floor(remaining * r), all remaining at the last step, clamped to >= 1 (§6.2)."""
    remaining = masked.sum(dim=-1)  # (B,)
    fraction = dream_reveal_fraction(schedule, step)
    k = torch.floor(remaining.double() * fraction).long()
    return torch.clamp(k, min=1)


def transfer_origin(
    masked: Tensor, fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    """Dream `origin`: each masked slot independently revealed with probability r (1 at the end)."""
    u = torch.rand(masked.shape, generator=generator, device=masked.device)
    return masked & (u < fraction)


def llada_quota(masked: Tensor, steps: int) -> Tensor:
    """LLaDA `get_num_transfer_tokens`: (B, steps) long, n // s each, +1 for the first n % s."""
    n = masked.sum(dim=-1, keepdim=True)  # (B, 1)
    base = n // steps
    extra = (torch.arange(steps, device=masked.device)[None, :] < (n % steps)).long()
    return base + extra
