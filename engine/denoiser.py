"""The denoising loop: fill a batch of masked holes, one step at a time.

Reads top to bottom:
1. `denoise` encodes the context once: one row's layout serves every bucket row (shared_context).
   The head runs only on the rows that predict hole slots (row s-1 for slot s when shifted).
2. Each step samples every masked slot, a transfer strategy (engine/sampler.py) picks which to
   commit, and the hole is written in place. Once a row commits an end token, its still-masked
   slots to the right become EOS (DreamOn's pad_eos_to_right): nothing after an end is kept.
3. The next logits come from `model.step` over the hole columns that matter (open slots, their
   predictors, slots that just changed: engine/step_cache.py) against the cached K/V of the rest
   (Fast-dLLM's dual cache, design/engine.md §2.1, with committed slots frozen), or from a full
   re-encode every `cache_refresh_every` steps, or from a plain full forward every step when
   `use_cache` is off (the reference path).
4. Between steps: stop when no masks remain, when the cancel event is set, or past the deadline;
   rows with nothing open (or already cut by the stop mode) leave the batch.

`denoise_expanding` is DreamOn's variable-length loop (models.md §4): batch 1, one commit per
step, a full forward each step because expansions and deletions move the suffix.
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
from engine.model import ContextKV, apply_rope, rope_tables
from engine.step_cache import StepCache, plan_queries

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
        longest = masked.shape[1]
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


def sync_interval(device: torch.device) -> int:
    """Steps between 'all done?' checks: each check is a host sync, cheap on CPU only."""
    return 1 if device.type == "cpu" else 2


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
) -> Denoised:
    """Denoise every row of `batch` (dual cache unless request.use_cache is off).

    `decided(tokens)` says whether a row's committed run from its first slot already fixes the
    text the caller will keep (a stop mode cut inside it): such a row stops there, its other
    masked slots become forced EOS. Rows with nothing left to fill leave the batch, so a
    finished short bucket no longer costs a forward share while a long one is still going."""
    started = time.perf_counter()
    shift = 1 if args.logit_shift else 0
    lmax = batch.max_hole
    hs = batch.hole_start
    q0 = hs - shift  # first query column: the lead token that predicts hole slot 0
    device = batch.ids.device
    ids = batch.ids.clone()  # (B, T)
    hole_valid = batch.hole_valid  # (B, Lmax)
    # On CUDA the query block keeps its full width (fixed shapes, no host sync per step).
    fixed_width = None if device.type == "cpu" else lmax + shift
    all_rows = torch.arange(ids.shape[0], device=device)[:, None]

    def head(hidden: Tensor) -> Tensor:
        return model.output(hidden).index_fill_(-1, banned_ids, float("-inf"))

    def full_pass() -> tuple[Tensor, StepCache | None]:
        """Whole rows: logits for every slot and, with the cache on, a fresh cache."""
        if request.use_cache:
            hidden, ctx = model.encode(ids, batch.positions, key_valid=batch.key_valid)
            fresh = StepCache.from_context(ctx, batch.key_valid)
        else:
            hidden, fresh = model.forward(ids, batch.positions, key_valid=batch.key_valid), None
        return head(hidden[:, q0:q0 + lmax]), fresh  # (B, Lmax, V)

    def cached_pass(cache: StepCache, rows: Tensor | None, masked: Tensor, stale: Tensor
                    ) -> Tensor:
        """One step for the open `rows` (None: all) -> (b, Lmax, V) logits."""
        pick = slice(None) if rows is None else rows
        plan = plan_queries(masked[pick], stale[pick], hole_valid[pick], shift, fixed_width)
        columns = q0 + plan.offsets  # (b, n)
        written = torch.where(plan.valid, columns, cache.scratch)
        ctx_valid = cache.valid.scatter(1, written, False)  # queried columns come fresh
        at = (all_rows if rows is None else rows[:, None], columns)  # no full-row copies
        hidden, kv = model.step(ids[at], batch.positions[at], plan.valid,
                                cache.context(), ctx_valid, return_kv=True)
        cache.write(written, kv)
        stale[pick] = False
        index = plan.predictor[..., None].expand(-1, -1, hidden.shape[-1])
        return head(hidden.gather(1, index))

    mask_id, eos_id = args.mask_token_id, args.eos_token_id
    masked = (ids[:, hs:hs + lmax] == mask_id) & hole_valid
    stale = torch.zeros_like(masked)  # slots whose token changed since their K/V were cached
    if request.use_cache and ids.shape[0] > 1:
        cache = StepCache.from_context(*shared_context(model, args, batch))
        logits = cached_pass(cache, None, masked, stale)
    else:
        logits, cache = full_pass()
    if device.type == "cuda":  # one sync per request, so that encode_ms is the real cost
        torch.cuda.synchronize(device)
    encode_ms = (time.perf_counter() - started) * 1000.0
    out = Denoised(
        hole=ids[:, hs:hs + lmax],
        confidence=torch.zeros(ids.shape[0], lmax, device=device),
        forced=torch.zeros_like(hole_valid),
        forward_passes=1,
    )
    commit = Committer(request, masked, temperatures, generator, end_ids)
    per_step: list[Tensor] = []
    every = sync_interval(device)
    step = 0
    rows: Tensor | None = None  # indices of the rows still denoised; None: all of them
    while True:
        previous = ids[:, hs:hs + lmax].clone()
        take, tokens, prob = commit(logits, masked, step, rows)
        hole = torch.where(take, tokens, previous)
        out.confidence = torch.where(take, prob, out.confidence)
        hole, forced = pad_after_end(hole, hole_valid, end_ids, mask_id, eos_id)
        out.forced |= forced
        ids[:, hs:hs + lmax] = hole
        masked = (hole == mask_id) & hole_valid
        step += 1
        if step % every == 0:  # host work: only where the loop syncs anyway
            if decided is not None:
                closed = _close_decided(hole, masked, decided)  # (B, Lmax) slots to pad
                if closed is not None:
                    hole = torch.where(closed, torch.full_like(hole, eos_id), hole)
                    ids[:, hs:hs + lmax] = hole
                    out.forced |= closed
                    forced = forced | closed
                    masked &= ~closed
            live = masked.any(dim=1)
            if not bool(live.any()):
                per_step.append(take.sum(dim=1) + forced.sum(dim=1))
                break
            if cache is not None:
                still = live.nonzero().flatten()
                if still.numel() < (ids.shape[0] if rows is None else rows.numel()):
                    local = still if rows is None else torch.searchsorted(rows, still)
                    cache, rows = cache.select(local), still
        stale |= hole != previous
        per_step.append(take.sum(dim=1) + forced.sum(dim=1))
        if step >= commit.steps:
            break
        if stop.halts(out):
            break
        refresh = request.cache_refresh_every > 0 and step % request.cache_refresh_every == 0
        if request.use_cache and not refresh:
            logits = cached_pass(cache, rows, masked, stale)
        else:
            logits, cache = full_pass()
            rows = None
            stale.zero_()
        out.forward_passes += 1

    out.hole = ids[:, hs:hs + lmax]
    out.commits = torch.stack(per_step, dim=1).tolist()  # one host transfer for the whole run
    out.encode_ms = encode_ms
    out.denoise_ms = (time.perf_counter() - started) * 1000.0 - encode_ms
    return out


def shared_context(model, args: ModelArgs, batch: InfillBatch) -> tuple[ContextKV, Tensor]:
    """K/V for every row from ONE encode of the longest row -> (ctx, valid (B, T)).

    Rows differ only in hole length, so their contexts match token for token; a shorter row's
    suffix sits `lmax - n` positions further left, which for RoPE keys is an exact rotation.
    Every row uses the longest row's columns: its own hole slots, then the suffix after the
    longest hole (`valid` hides the slots past a row's own hole). The context states are those
    computed beside the longest hole's masks: the same staleness the dual cache accepts across
    steps. Encoding 1 row instead of B cuts the encode B-fold."""
    lengths = torch.tensor(batch.hole_lengths, device=batch.ids.device)
    longest = batch.hole_lengths.index(batch.max_hole)  # on the host: no device sync
    one = slice(longest, longest + 1)
    _, ctx1 = model.encode(batch.ids[one], batch.positions[one], key_valid=batch.key_valid[one])
    hs, after = batch.hole_start, batch.hole_start + batch.max_hole
    cos, sin = rope_tables((lengths - batch.max_hole)[:, None], args.head_dim, args.rope_theta)
    n_rows = lengths.numel()
    keys, values = [], []
    for k, v in zip(ctx1.k, ctx1.v, strict=True):  # each (1, Hkv, T, D)
        k_rows = k.expand(n_rows, -1, -1, -1).clone()
        k_rows[:, :, after:] = apply_rope(k[:, :, after:], cos, sin)  # (B, 1, 1, D) angles
        keys.append(k_rows)
        values.append(v.expand(n_rows, -1, -1, -1))
    columns = torch.arange(batch.ids.shape[1], device=batch.ids.device)[None, :]
    past_own_hole = (columns >= hs + lengths[:, None]) & (columns < after)
    valid = batch.key_valid[one].expand(n_rows, -1) & ~past_own_hole
    return ContextKV(k=keys, v=values), valid


def _close_decided(hole: Tensor, masked: Tensor, decided: Callable[[list[int]], bool]
                   ) -> Tensor | None:
    """Masked slots of rows whose committed run from slot 0 is `decided`, or None if none."""
    closed = None
    for r, (tokens, open_slots) in enumerate(zip(hole.tolist(), masked.tolist(), strict=True)):
        if not any(open_slots):
            continue
        run = tokens[: open_slots.index(True)]
        if run and decided(run):
            if closed is None:
                closed = torch.zeros_like(masked)
            closed[r] = masked[r]
    return closed


def denoise_expanding(
    model,
    args: ModelArgs,
    lead: list[int],
    tail: list[int],
    request: CompletionRequest,
    *,
    initial_length: int,
    window: int,
    temperature: float,
    generator: torch.Generator,
    stop: StopSignal,
    device: torch.device,
    end_ids: set[int],
    banned_ids: Tensor,
) -> Denoised:
    """DreamOn (models.md §4): the hole grows where EXPAND is committed and shrinks where an end
    token fills a slot that was MASK at the step's start. One commit per step, full forward."""
    started = time.perf_counter()
    expand_id, mask_id = args.expand_token_id, args.mask_token_id
    hole = [mask_id] * initial_length
    budget = request.max_tokens  # expansions left (DreamOn: Lmax); cap bounds the hole anyway
    cap = min(window, len(lead) + request.max_tokens + len(tail))
    out = Denoised(hole=torch.empty(0), confidence=torch.empty(0), forced=torch.empty(0))
    confidences = [0.0] * len(hole)
    per_step: list[int] = []
    encode_ms = 0.0
    for step in range(4 * request.max_tokens + 8):  # safety bound; ~final length + expansions
        masked_slots = [i for i, tok in enumerate(hole) if tok == mask_id]
        if not masked_slots:
            break
        if stop.halts(out):
            break
        seq = torch.tensor([lead + hole + tail], device=device)
        positions = torch.arange(seq.shape[1], device=device)[None, :]
        hidden = model.forward(seq, positions)
        hs = len(lead)
        logits = model.output(hidden[:, hs - 1:hs - 1 + len(hole)])  # (1, n, V), shifted
        logits.index_fill_(-1, banned_ids, float("-inf"))
        out.forward_passes += 1
        if step == 0:
            encode_ms = (time.perf_counter() - started) * 1000.0
        if len(lead) + len(hole) + len(tail) >= cap or budget == 0:
            logits[..., expand_id] = float("-inf")
        # DreamOn scores slots by negative entropy and commits the single surest one.
        drawn = sampler.sample(
            logits, temperature=temperature, top_p=request.top_p, generator=generator
        )
        masked = (torch.tensor(hole, device=device) == mask_id)[None, :]
        take = sampler.best_per_row(sampler.neg_entropy(drawn.probs), masked)[0]
        prob = sampler.token_probability(drawn.probs, drawn.tokens)[0]
        slot = int(take.to(torch.int64).argmax())  # batch 1, one commit: the host needs it
        token = int(drawn.tokens[0, slot])
        hole[slot] = token
        confidences[slot] = float(prob[slot])
        if token == expand_id:  # one slot becomes two masks: the hole grows
            hole[slot:slot + 1] = [mask_id, mask_id]
            confidences[slot:slot + 1] = [0.0, 0.0]
            budget -= 1
        elif token in end_ids:
            # Delete: the end token and every still-masked slot right of it (pad_eos_to_right,
            # then removal of EOS in slots that were MASK) disappear; the suffix moves left.
            keep = [i for i, t in enumerate(hole) if i < slot or (i > slot and t != mask_id)]
            hole = [hole[i] for i in keep]
            confidences = [confidences[i] for i in keep]
        per_step.append(1)
    out.hole = torch.tensor([hole], dtype=torch.long)
    out.confidence = torch.tensor([confidences], dtype=torch.float32)
    out.forced = torch.zeros_like(out.hole, dtype=torch.bool)
    out.commits = [per_step]
    out.encode_ms = encode_ms
    out.denoise_ms = (time.perf_counter() - started) * 1000.0 - encode_ms
    return out

