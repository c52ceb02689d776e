"""The denoising loop: fill a batch of masked holes, one step at a time.

Reads top to bottom:
1. `denoise` picks where logits come from (engine/passes.py): a static pass over fixed shapes
   (the CUDA default, replayed as a CUDA graph), a shrinking eager pass (the CPU default), or a
   full forward every step (`use_cache` off: the reference path). The cached ones encode the
   context once for every bucket row (engine/kv_arena.py) and run the head only on the entries
   that predict hole slots (entry s-1 for slot s when shifted).
2. Each step samples every masked slot, a transfer strategy (engine/sampler.py) picks which to
   commit, and the hole is written in place. Once a row commits an end token, its still-masked
   slots to the right become EOS (DreamOn's pad_eos_to_right): nothing after an end is kept.
3. Every `check_every` steps the loop reads the hole to the host once (the only host sync of the
   interval): it stops when no masks remain, and rows whose text the stop mode has already
   decided are closed. Cancellation and the deadline are host-side flags, checked every step.
4. With `cache_refresh_every`, the whole context is re-encoded every N steps.

DreamOn's variable-length loop is engine/dreamon.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine import sampler
from engine.api import CompletionRequest
from engine.config import ModelArgs
from engine.fim import InfillBatch
from engine.kv_arena import Layout
from engine.passes import ShrinkingSource, StaticSource, UncachedSource

DREAM_TOPK_SAMPLERS = ("maskgit_plus", "topk_margin", "entropy")


@dataclass
class StopSignal:
    """Cancellation and deadline, checked between steps (never inside one)."""

    cancel: threading.Event | None = None
    deadline: float | None = None  # time.monotonic() seconds

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def halts(self, out: Denoised) -> bool:
        """True when the loop must stop now; records why on `out`."""
        out.cancelled = self.cancelled()
        out.timed_out = not out.cancelled and self.expired()
        return out.cancelled or out.timed_out


@dataclass
class Denoised:
    hole: Tensor  # (B, Lmax) final ids of the hole columns (MASK where never committed)
    confidence: Tensor  # (B, Lmax) p(token) when it was committed, 0 if never sampled
    forced: Tensor  # (B, Lmax) bool, EOS written by the pad-to-right rule, not by the model
    commits: list[list[int]] = field(default_factory=list)  # per row: slots filled per step
    forward_passes: int = 0
    cancelled: bool = False
    timed_out: bool = False
    encode_ms: float = 0.0
    denoise_ms: float = 0.0


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


def default_check_every(device: torch.device, static: bool) -> int:
    """Steps between host reads. The shrinking CPU pass syncs every step anyway (its query
    plan is sized on the host); a static pass waits a few steps, as dInfer does: each read
    stalls the GPU queue, and a finished row merely idles in its static batch until then."""
    return 2 if static else 1


def denoise(
    model,
    args: ModelArgs,
    batch: InfillBatch,
    request: CompletionRequest,
    *,
    temperatures: list[float],  # per-row sampling temperature
    end_ids: Tensor,  # (E,) ids that end a completion (EOS, PAD, ...)
    banned_ids: Tensor,  # ids never written into a hole (MASK itself, untrained padded rows)
    generator: torch.Generator,
    stop: StopSignal,
    decided: Callable[[list[int]], bool] | None = None,
    static_pass: Callable[[Layout], object] | None = None,
    check_every: int | None = None,
) -> Denoised:
    """Denoise every row of `batch`.

    `static_pass(layout) -> StaticPass` selects fixed shapes (engine/graphs.py hands out
    captured graphs on CUDA); None takes the shrinking eager pass. `decided(tokens)` says
    whether a row's committed run from its first slot already fixes the text the caller will
    keep (a stop mode cut inside it): such a row stops there, its other masked slots become
    forced EOS."""
    started = time.perf_counter()
    device = batch.ids.device
    static = static_pass is not None and request.use_cache
    layout = Layout.of(batch, args, static)
    if not request.use_cache:
        source = UncachedSource(model, batch, layout, banned_ids)
    elif static:
        source = StaticSource(model, args, batch, layout, static_pass(layout))
    else:
        source = ShrinkingSource(model, args, batch, layout, banned_ids, model.norm.weight.dtype)
    hole = source.hole  # (R, W): the loop writes the hole here; the next pass reads it
    n_rows, width = hole.shape
    hole_valid = torch.zeros(n_rows, width, dtype=torch.bool, device=device)
    hole_valid[:layout.rows, :layout.lmax] = batch.hole_valid
    mask_id, eos_id = args.mask_token_id, args.eos_token_id
    masked = (hole == mask_id) & hole_valid
    stale = torch.zeros_like(masked)  # slots whose token changed since their K/V were written
    rows: Tensor | None = None  # shrinking: indices of the rows still denoised (None: all)

    logits = source.first if source.first is not None else source.logits(masked, stale, rows)
    if device.type == "cuda":  # one sync per request, so that encode_ms is the real cost
        torch.cuda.synchronize(device)
    encode_ms = (time.perf_counter() - started) * 1000.0
    out = Denoised(hole=hole, confidence=torch.zeros(n_rows, width, device=device),
                   forced=torch.zeros_like(hole_valid), forward_passes=1)
    commit = Committer(request, masked, temperatures + [0.0] * (n_rows - len(temperatures)),
                       generator, end_ids, longest=layout.lmax)
    per_step: list[Tensor] = []
    every = check_every or default_check_every(device, static)
    step = 0
    while True:
        take, tokens, prob = commit(logits, masked, step, rows)
        new = torch.where(take, tokens, hole)
        out.confidence = torch.where(take, prob, out.confidence)
        new, forced = pad_after_end(new, hole_valid, end_ids, mask_id, eos_id)
        out.forced |= forced
        if source.shrinks:
            stale |= new != hole
        hole.copy_(new)
        masked = (new == mask_id) & hole_valid
        per_step.append(take.sum(dim=1) + forced.sum(dim=1))
        step += 1
        if step % every == 0:  # the interval's one host read
            tokens_now, open_now = _to_host(hole, masked)
            closed = _close_decided(tokens_now, open_now, decided) if decided else []
            if closed:
                close = torch.zeros_like(masked)
                close[closed] = True
                close &= masked
                hole.copy_(torch.where(close, torch.full_like(hole, eos_id), hole))
                out.forced |= close
                per_step[-1] = per_step[-1] + close.sum(dim=1)
                masked &= ~close
            live = [r for r, slots in enumerate(open_now) if any(slots) and r not in closed]
            if not live:
                break
            if source.shrinks and len(live) < (n_rows if rows is None else rows.numel()):
                still = torch.tensor(live, device=device)
                local = still if rows is None else torch.searchsorted(rows, still)
                source.select(local)
                rows = still
        if step >= commit.steps:
            break
        if stop.halts(out):
            break
        if request.cache_refresh_every > 0 and step % request.cache_refresh_every == 0:
            source.refresh(_full_rows(batch, layout, hole))
            rows = None
            stale.zero_()
        logits = source.logits(masked, stale, rows)
        out.forward_passes += 1

    out.hole = hole[:layout.rows, :layout.lmax]
    out.confidence = out.confidence[:layout.rows, :layout.lmax]
    out.forced = out.forced[:layout.rows, :layout.lmax]
    commits = torch.stack(per_step, dim=1)[:layout.rows]
    out.commits = commits.to("cpu", copy=True).tolist()  # one host transfer for the whole run
    out.encode_ms = encode_ms
    out.denoise_ms = (time.perf_counter() - started) * 1000.0 - encode_ms
    return out


def _to_host(hole: Tensor, masked: Tensor) -> tuple[list[list[int]], list[list[bool]]]:
    """Hole tokens and open slots in ONE device-to-host copy (the loop's only sync)."""
    both = torch.stack((hole, masked.to(hole.dtype))).to("cpu", copy=True).tolist()
    return both[0], [[bool(x) for x in row] for row in both[1]]


def _full_rows(batch: InfillBatch, layout: Layout, hole: Tensor) -> Tensor:
    """The real rows' token ids with their current holes (for a re-encode)."""
    ids = batch.ids.clone()
    start = layout.hole_start
    ids[:, start:start + layout.lmax] = hole[:layout.rows, :layout.lmax]
    return ids


def _close_decided(hole: list[list[int]], masked: list[list[bool]],
                   decided: Callable[[list[int]], bool]) -> list[int]:
    """Rows with open slots whose committed run from slot 0 is `decided`."""
    closed = []
    for r, (tokens, open_slots) in enumerate(zip(hole, masked, strict=True)):
        if not any(open_slots):
            continue
        run = tokens[: open_slots.index(True)]
        if run and decided(run):
            closed.append(r)
    return closed
