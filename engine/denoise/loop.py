"""The denoising loop: fill the masked holes of every request in flight, one step at a time.

ONE driver, read top to bottom in `DenoiseLoop.turn`; the engine's worker thread
(engine/denoise/batch_worker.py) calls it once per round with whatever it admitted, and
`run_alone` calls it on the caller's thread for one request (the engine without a worker, the
benchmarks). A round:
1. admit: each newcomer's context is filled (from the context cache when it can) and it gets a
   `Source` of logits (engine/denoise/passes.py): a member of the static batch over fixed shapes
   (the CUDA default, replayed as a CUDA graph; engine/denoise/static_batch.py), a shrinking
   eager source (the CPU default; sources in flight share one packed pass), or a full forward
   every step (`use_cache` off: the reference). Sources of one group share one pass.
2. step every request in flight: ONE pass per group; each request (a `RequestState`) samples its
   masked slots, its sampler's strategy (engine/denoise/committer.py, strategies/) picks which to
   commit, and its hole is written in place. Once a row commits an end token, its still-masked
   slots to the right become EOS (DreamOn's pad_eos_to_right).
3. one host read per interval: every `check_every` steps the holes of the requests due are read
   to the host in ONE transfer: a request stops when no masks remain, rows whose text the stop
   mode has already decided are closed, finished rows leave a shrinking pass, and a job's
   `on_read` (streamed drafts) is handed the same read, so drafts cost no extra sync.
4. finish: a request past its schedule, cancelled or past its deadline (host-side flags,
   checked every step) is answered and leaves between passes without disturbing the others;
   with `cache_refresh_every`, one still in flight re-encodes its context every N steps.
A cancel reaches the model within one layer: the encode and the pass check it between layers
(model.ENCODE_GATE / STEP_GATE) once every request in them was cancelled.

DreamOn's variable-length loop is engine/denoise/dreamon.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from engine.api import CompletionRequest
from engine.denoise.committer import Committer, pad_after_end
from engine.denoise.context_cache import ContextCache
from engine.denoise.fim import InfillBatch, lead_specials
from engine.denoise.kv_arena import Layout
from engine.denoise.passes import ShrinkingSource, Source, UncachedSource
from engine.denoise.prefill import context_ids
from engine.model.config import ModelArgs
from engine.model.transformer import ENCODE_GATE, STEP_GATE, EncodeInterrupted

log = logging.getLogger(__name__)

__all__ = ["Answer", "DenoiseJob", "DenoiseLoop", "Denoised", "RequestState", "StopSignal",
           "run_alone"]

# Who waits for a request: told its result (None: it never ran) or the error that failed it.
Answer = Callable[..., None]  # answer(result=None, error=None)


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
    """A request's outcome. Its tensors are on the CPU: whoever reads them (the engine's caller,
    on its own thread) must not touch the device while the model's thread may be capturing a
    CUDA graph there."""

    hole: Tensor  # (B, Lmax) final ids of the hole columns (MASK where never committed)
    confidence: Tensor  # (B, Lmax) p(token) when it was committed, 0 if never sampled
    forced: Tensor  # (B, Lmax) bool, EOS written by the pad-to-right rule, not by the model
    commits: list[list[int]] = field(default_factory=list)  # per row: slots filled per step
    forward_passes: int = 0
    cancelled: bool = False
    timed_out: bool = False
    encode_ms: float = 0.0
    denoise_ms: float = 0.0
    reused_tokens: int = 0  # context tokens whose K/V came from an earlier request
    speculative_hit: bool = False  # they came from a context prepared "as if accepted"
    batch_rows: int = 0  # most rows in one pass it shared (its own included)


@dataclass
class DenoiseJob:
    """Everything one request's denoising needs; the loop owns it once started.

    A caller on another thread builds it on the CPU (batch, end_ids, a seed instead of a
    generator); the loop moves it to the model's device when it starts it (`on`), on the
    thread that runs the model."""

    batch: InfillBatch
    request: CompletionRequest
    temperatures: list[float]  # per row
    end_ids: Tensor  # (E,) ids that end a completion (EOS, PAD, ...)
    banned_ids: Tensor  # ids never written into a hole, on the model's device
    generator: torch.Generator | None  # None: one seeded with `seed` on the model's device
    stop: StopSignal
    # Whether a row's committed run from its first slot already fixes the text the caller
    # keeps (a stop mode cut inside it): such a row stops there, its other masked slots become
    # forced EOS.
    decided: Callable[[list[int]], bool] | None = None
    check_every: int | None = None
    reuse: bool = True  # look the context up in (and add it to) the loop's context cache
    seed: int = 0
    # Told (step, hole rows, open slots) at each host read, on the model's thread, with the
    # lists that read made anyway: it must only hand them on (engine/denoise/drafts.py).
    on_read: Callable[[int, list[list[int]], list[list[bool]]], None] | None = None

    @property
    def rows(self) -> int:
        return len(self.batch.hole_lengths)

    def on(self, device: torch.device) -> DenoiseJob:
        """This job with its tensors and its generator on `device`."""
        generator = self.generator
        if generator is None:
            generator = torch.Generator(device).manual_seed(self.seed)
        return replace(self, batch=self.batch.to(device), end_ids=self.end_ids.to(device),
                       generator=generator)


class DenoiseLoop:
    """Drives every request in flight, one shared pass per round. Not thread-safe: one thread
    (the engine's worker, or `run_alone`'s caller) owns it and the model."""

    def __init__(self, model, args: ModelArgs, *, passes=None, cache: ContextCache | None = None,
                 dtype: torch.dtype | None = None, banned_ids: Tensor | None = None):
        self.model, self.args, self.cache = model, args, cache
        self.dtype = dtype or model.norm.weight.dtype
        self.static = None
        if passes is not None:
            from engine.denoise.static_batch import StaticBatch

            self.static = StaticBatch(model, args, passes, banned_ids)
        self.active: list[RequestState] = []

    @property
    def rows(self) -> int:
        return sum(s.job.rows for s in self.active)

    def turn(self, newcomers: list[tuple[DenoiseJob, Answer | None]]) -> int:
        """One round: admit the newcomers, then step every request in flight (one pass, one
        host read for those due) and answer the ones that ended. Returns the rows of the pass
        it ran (0: none ran, nothing in flight or the pass failed)."""
        for job, answer in newcomers:
            self._admit(job, answer)
        if not self.active:
            return 0
        rows = self.rows
        try:
            with stop_gates([s.job.stop for s in self.active]):
                ended = self.iterate()
        except EncodeInterrupted:  # every request in the pass was cancelled mid-pass
            for state in self.abort():
                # Answered as cancelled with what it had (passes, reused context), not as
                # unrun: a keystroke replay counts the reuse of superseded requests too.
                done = state.finish()
                done.cancelled = True
                _tell(state.answer, done)
            return 0
        except Exception as error:  # noqa: BLE001 - a failed pass fails its requests
            log.warning("a denoising pass failed: %s", error)
            for state in self.abort():
                _tell(state.answer, error=error)
            return 0
        for state in ended:
            _tell(state.answer, state.result)
        return rows

    def _admit(self, job: DenoiseJob, answer: Answer | None) -> None:
        """Start one newcomer; a failure (or a cancel during its encode) is its own."""
        try:
            with stop_gates([job.stop]):
                state = self.start(job)
        except EncodeInterrupted:  # cancelled during its context encode: it never ran
            _tell(answer, None)
            return
        except Exception as error:  # noqa: BLE001 - this request fails, the others go on
            _tell(answer, error=error)
            return
        state.answer = answer

    def start(self, job: DenoiseJob) -> RequestState:
        """Admit a request: fill its context (from the cache when it can) and its first
        logits where its prefill gives them."""
        started = time.perf_counter()
        args, request = self.args, job.request
        static = self.static is not None and request.use_cache
        keep = self.cache is not None and job.reuse and request.use_cache
        context = context_ids(job.batch) if keep else None  # (read before the batch moves)
        job = job.on(job.banned_ids.device)
        batch = job.batch
        layout = Layout.of(batch, args, static)
        plan = None
        if keep:
            plan = self.cache.plan(context[0], context[1], len(lead_specials(args)),
                                   query_from=layout.lead, hole=layout.lmax)
        source: Source
        if not request.use_cache:
            source = UncachedSource(self.model, batch, layout, job.banned_ids)
        elif static:
            source = self.static.join(batch, layout, plan, context, keep)
        else:
            source = ShrinkingSource(self.model, args, batch, layout, job.banned_ids, self.dtype,
                                     plan, context, keep)
        try:
            state = RequestState(job, source, layout, static, started, args.mask_token_id)
        except BaseException:
            source.leave()
            raise
        prefilled = source.prefilled
        if keep and prefilled is not None and prefilled.entry is not None:  # cold: cache it now
            self.cache.put(prefilled.entry)
        self.active.append(state)
        return state

    def iterate(self) -> list[RequestState]:
        """One pass for every request in flight; returns the ones that ended (and left)."""
        states = list(self.active)
        rows = self.rows
        for s in states:
            s.out.batch_rows = max(s.out.batch_rows, rows)
        # Step every request in flight: one pass per group of sources...
        logits = self._logits([s for s in states if s.pending is None])
        if self.cache is not None:  # warm requests whose first pass just ran
            for s in states:
                entry = s.source.new_entry()
                if entry is not None:
                    self.cache.put(entry, replaces=s.source.prefilled.source)
        # ...each commits its step...
        mask_id, eos_id = self.args.mask_token_id, self.args.eos_token_id
        for s in states:
            step_logits, s.pending = (s.pending if s.pending is not None else logits[s]), None
            s.advance(step_logits, mask_id, eos_id)
        # ...one host read for the requests due...
        due = [s for s in states if s.due]
        for s, (tokens_now, open_now) in zip(due, _to_host([(s.hole, s.masked) for s in due]),
                                             strict=True):
            s.read(tokens_now, open_now, eos_id)
        # ...and the ones that ended leave.
        ended = []
        for s in states:
            s.check_end()
            if s.finished:
                s.result = s.finish()  # before it leaves: its rows are reused at once
                ended.append(s)
            else:
                self._maybe_refresh(s)
        for s in ended:
            self.leave(s)
        return ended

    def leave(self, state: RequestState) -> None:
        if state in self.active:
            self.active.remove(state)
            state.source.leave()

    def abort(self) -> list[RequestState]:
        """Drop every request in flight (after a failed pass); returns them."""
        dropped = list(self.active)
        for s in dropped:
            self.leave(s)
        return dropped

    def _logits(self, states: list[RequestState]) -> dict[RequestState, Tensor]:
        """ONE pass per group of sources (the packed shrinking pass, the static batch's pass,
        each reference source's own forward)."""
        groups: dict[object, list[RequestState]] = {}
        for s in states:
            groups.setdefault(s.source.group, []).append(s)
        out: dict[RequestState, Tensor] = {}
        for group, members in groups.items():
            out.update(zip(members, group.run(members), strict=True))
        return out

    def _maybe_refresh(self, s: RequestState) -> None:
        every = s.job.request.cache_refresh_every
        if every <= 0 or s.step % every != 0:
            return
        s.source.refresh(_full_rows(s.job.batch, s.layout, s.hole))
        s.rows = None
        s.stale.zero_()


def run_alone(loop: DenoiseLoop, job: DenoiseJob) -> Denoised | None:
    """Denoise one request on this thread: the same loop, with nothing else in flight. None
    when it never ran (cancelled before it reached the model); raises what failed it."""
    if job.stop.cancelled():
        return None
    told: dict = {}

    def answer(result: Denoised | None = None, error: BaseException | None = None) -> None:
        told.update(result=result, error=error)

    try:
        with torch.inference_mode():
            loop.turn([(job, answer)])
            while not told and loop.active:
                loop.turn([])
    finally:
        loop.abort()
    if told.get("error") is not None:
        raise told["error"]
    return told.get("result")


def _tell(answer: Answer | None, result: Denoised | None = None,
          error: BaseException | None = None) -> None:
    if answer is not None:
        answer(result, error)
    elif error is not None:  # nobody to tell (a benchmark driving the loop): fail loudly
        raise error


@contextmanager
def stop_gates(stops: list[StopSignal]) -> Iterator[None]:
    """While inside: between two layers of an encode or a pass, stop (EncodeInterrupted) once
    every one of `stops` was cancelled."""
    gate = _stop_gate(stops)
    tokens = ENCODE_GATE.set(gate), STEP_GATE.set(gate)
    try:
        yield
    finally:
        ENCODE_GATE.reset(tokens[0])
        STEP_GATE.reset(tokens[1])


def _stop_gate(stops: list[StopSignal]) -> Callable[[Tensor], None]:
    def gate(_hidden: Tensor) -> None:
        """The flag is read on the host, no device sync: the layers already queued on a GPU
        finish, none is added. Never while a CUDA graph is being captured (its Python runs
        once; the replays never call this)."""
        if stops and all(stop.cancelled() for stop in stops):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return
            raise EncodeInterrupted

    return gate


# ---- one request between passes: the parts of a step that are its own


def default_check_every(device: torch.device, static: bool) -> int:
    """Steps between host reads. The shrinking CPU pass syncs every step anyway (its query
    plan is sized on the host); a static pass waits a few steps, as dInfer does: each read
    stalls the GPU queue, and a finished row merely idles in its static batch until then."""
    return 2 if static else 1


class RequestState:
    """One request between passes: its hole, masks, confidences and commit schedule."""

    def __init__(self, job: DenoiseJob, source: Source, layout: Layout, static: bool,
                 started: float, mask_id: int):
        self.job, self.source, self.layout = job, source, layout
        self.started = started
        batch, request = job.batch, job.request
        hole = source.hole  # (rows, lmax): the loop writes the hole here; the next pass reads it
        device = hole.device
        self.hole_valid = batch.hole_valid
        self.masked = (hole == mask_id) & self.hole_valid
        self.stale = torch.zeros_like(self.masked)  # changed since their K/V were written
        self.rows: Tensor | None = None  # shrinking: the rows still denoised (None: all)
        self.out = Denoised(hole=hole, confidence=torch.zeros(hole.shape, device=device),
                            forced=torch.zeros_like(self.hole_valid))
        self.commit = Committer(request, self.masked, job.temperatures, job.generator,
                                job.end_ids, longest=layout.lmax)
        self.per_step: list[Tensor] = []
        self.every = job.check_every or default_check_every(device, static)
        self.step = 0
        self.finished = False
        self.pending: Tensor | None = source.first  # logits the prefill already made
        prefilled = source.prefilled
        if prefilled is not None:
            self.out.reused_tokens = prefilled.reused
            self.out.speculative_hit = prefilled.source is not None and \
                prefilled.source.speculative
        self.result: Denoised | None = None  # set when it ends, before it leaves
        self.answer: Answer | None = None  # who waits for it (None: nobody, a benchmark)

    @property
    def hole(self) -> Tensor:
        return self.source.hole

    @property
    def greedy(self) -> bool:
        return self.commit.greedy

    def advance(self, logits: Tensor, mask_id: int, eos_id: int) -> None:
        """Commit this step's tokens from `logits` (its open rows, or all)."""
        out, hole, job = self.out, self.source.hole, self.job
        if out.forward_passes == 0:
            if hole.is_cuda:  # one sync per request, so that encode_ms is the real cost
                torch.cuda.synchronize(hole.device)
            out.encode_ms = (time.perf_counter() - self.started) * 1000.0
        out.forward_passes += 1
        take, tokens, prob = self.commit(logits, self.masked, self.step, self.rows)
        new = torch.where(take, tokens, hole)
        out.confidence = torch.where(take, prob, out.confidence)
        new, forced = pad_after_end(new, self.hole_valid, job.end_ids, mask_id, eos_id)
        out.forced |= forced
        if self.source.shrinks:
            self.stale |= new != hole
        hole.copy_(new)
        self.masked = (new == mask_id) & self.hole_valid
        self.per_step.append(take.sum(dim=1) + forced.sum(dim=1))
        self.step += 1

    @property
    def due(self) -> bool:
        return self.step % self.every == 0

    def read(self, tokens_now: list[list[int]], open_now: list[list[bool]], eos_id: int) -> None:
        """The interval's host read: close decided rows, finish when nothing is open, and let
        finished rows leave a shrinking batch."""
        if self.job.on_read is not None:
            try:
                self.job.on_read(self.step, tokens_now, open_now)
            except Exception:  # noqa: BLE001 - a watcher must never fail the shared pass
                log.exception("a draft watcher failed")
        decided = self.job.decided
        closed = _close_decided(tokens_now, open_now, decided) if decided else []
        hole, out = self.source.hole, self.out
        if closed:
            close = torch.zeros_like(self.masked)
            close[closed] = True
            close &= self.masked
            hole.copy_(torch.where(close, torch.full_like(hole, eos_id), hole))
            out.forced |= close
            self.per_step[-1] = self.per_step[-1] + close.sum(dim=1)
            self.masked &= ~close
        live = [r for r, slots in enumerate(open_now) if any(slots) and r not in closed]
        if not live:
            self.finished = True
            return
        n_rows = self.layout.rows
        if self.source.shrinks and len(live) < (n_rows if self.rows is None else
                                                self.rows.numel()):
            still = torch.tensor(live, device=hole.device)
            local = still if self.rows is None else torch.searchsorted(self.rows, still)
            self.source.select(local)
            self.rows = still

    def check_end(self) -> None:
        """After the step: the schedule's end, cancellation, the deadline."""
        if not self.finished and (self.step >= self.commit.steps or
                                  self.job.stop.halts(self.out)):
            self.finished = True

    def finish(self) -> Denoised:
        """The request's result on the CPU (one transfer), detached from the buffers other
        requests keep using."""
        out, rows, lmax = self.out, self.layout.rows, self.layout.lmax
        parts = [self.source.hole[:rows, :lmax], out.confidence[:rows, :lmax],
                 out.forced[:rows, :lmax]]
        if self.per_step:
            parts.append(torch.stack(self.per_step, dim=1)[:rows])
        out.hole, out.confidence, out.forced, *commits = _to_cpu(parts)
        if commits:
            out.commits = commits[0].tolist()
        out.denoise_ms = (time.perf_counter() - self.started) * 1000.0 - out.encode_ms
        return out


def _to_host(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[list[list[int]],
                                                                list[list[bool]]]]:
    """Holes and open slots of several requests in ONE device-to-host copy (the loop's only
    sync)."""
    if not pairs:
        return []
    flat = torch.cat([torch.stack((h, m.to(h.dtype))).flatten() for h, m in pairs])
    values = flat.to("cpu", copy=True).tolist()
    out, start = [], 0
    for hole, _ in pairs:
        rows, width = hole.shape
        n = rows * width
        tokens = [values[start + r * width:start + (r + 1) * width] for r in range(rows)]
        opened = [[bool(x) for x in values[start + n + r * width:start + n + (r + 1) * width]]
                  for r in range(rows)]
        out.append((tokens, opened))
        start += 2 * n
    return out


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _to_cpu(tensors: list[Tensor]) -> list[Tensor]:
    """CPU copies of small tensors in ONE device-to-host transfer: packed as int64 (a float by
    its bits, so exactly), split and cast back on the host."""
    def bits(t: Tensor) -> Tensor:
        return t.view(_SAME_WIDTH_INT[t.element_size()]) if t.is_floating_point() else t

    flat = torch.cat([bits(t).reshape(-1).long() for t in tensors]).to("cpu", copy=True)
    out, start = [], 0
    for t in tensors:
        part = flat[start:start + t.numel()].view(t.shape)
        start += t.numel()
        out.append(part.to(bits(t).dtype).view(t.dtype))
    return out


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
