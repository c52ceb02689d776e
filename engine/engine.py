"""The Engine facade: load a checkpoint once, then serve fill-in-the-middle completions.

`complete` turns a CompletionRequest into token rows (engine/denoise/fim.py), denoises them in one
batch (engine/denoise/loop.py) and turns the holes back into ranked text candidates. It may be
called from several threads at once, each with its own cancel event: one worker thread owns the
model and requests in flight together share every denoising pass (engine/denoise/batch_worker.py).

Across requests the engine keeps recent contexts' K/V (engine/denoise/context_cache.py,
`context_reuse`)
so a keystroke re-encodes only what changed. When idle, the worker re-encodes a context whose
reuse chain just reached its hop limit (`refresh_worn`, engine/denoise/context_refresh.py), so the
next keystroke stays warm, and prepares the context as if the completion were accepted
(`speculate`), so accept + next request starts warm.
"""

from __future__ import annotations

import gc
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import get_args

import torch

from engine.api import (
    Candidate,
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    Draft,
    EngineError,
    EngineInfo,
    EngineInputError,
    QuantMode,
)
from engine.denoise import fim
from engine.denoise.batch_worker import BatchWorker, WorkerClosed
from engine.denoise.buckets import (
    BATCH_BUCKETS,
    EXPR_SPAN_GUESSES,
    LINE_SPAN_GUESSES,
    REFRESH_BUCKETS,
    SPAN_GUESSES,
)
from engine.denoise.context_cache import (
    DEFAULT_BUDGET_BYTES,
    DEFAULT_MAX_CHANGED,
    DEFAULT_MAX_REUSES,
    ContextCache,
)
from engine.denoise.context_refresh import refresh_context
from engine.denoise.drafts import DraftFeed
from engine.denoise.dreamon import denoise_expanding
from engine.denoise.graphs import PassCache
from engine.denoise.kv_arena import common_layouts
from engine.denoise.loop import Denoised, DenoiseJob, DenoiseLoop, StopSignal, run_alone
from engine.denoise.prefill import context_ids, entry_alone
from engine.denoise.repo_context import extra_ids
from engine.denoise.speculation import speculate_accepted
from engine.model.quantize import parameter_count, weight_bytes
from engine.request_checks import validate
from engine.stop import apply_stop, stop_after_accepting

EXTRA_CANDIDATE_TEMPERATURE = 0.8  # extra candidates must differ: sample them when T = 0
DREAMON_INITIAL_HOLE = 16  # DreamOn's L0 when the request gives none (its eval: 4..64)
# Below this size a CPU step is a string of small ops (~25 query rows x a few hundred features):
# a second thread costs more in wake-ups than it saves (embedded model, 2 cores: p50 470 ms with 1
# thread, 615-750 ms with 2; docs/LOG.md). Bigger models use torch's default, all cores.
SINGLE_THREAD_BELOW_PARAMS = 50_000_000
CPU_THREADS_ENV = "MASKFILL_CPU_THREADS"
DIFFUCODER_PAD = "<|dlm_pad|>"  # DiffuCoder ends spans with it (models.md §2.1); by name only
# Rows in one shared pass. A CPU pass costs what its rows cost, so more rows only make every
# request in it slower; on CUDA the captured batch buckets end at 16 rows.
CPU_BATCH_ROWS = 32
# Rows one request holds in flight (a bigger one runs in chunks, engine/denoise/job_chunks.py). A
# CPU
# pass costs what its rows cost, so a request sharing passes with a big one waits on the big
# one's rows at every step; half the batch leaves room for others while an editor's manual
# request (3 candidates x up to 4 lengths = 12 rows) still runs in one chunk, as fast as before
# (docs/LOG.md). A fixed-shape GPU pass costs the same for 1 or 16 rows: there a request may
# hold three quarters of the batch.
MAX_JOB_ROWS_CPU = 16
GPU_CONTEXT_CACHE_BYTES = 1 << 30


def hole_lengths(request: CompletionRequest) -> list[int]:
    """Explicit span lengths, else buckets up to max_tokens (which is always the longest tried)."""
    if request.span_lengths is not None:
        return sorted(set(request.span_lengths))
    short = {"line": LINE_SPAN_GUESSES, "expr": EXPR_SPAN_GUESSES}.get(request.stop)
    buckets = short or SPAN_GUESSES
    longest = min(request.max_tokens, buckets[-1]) if short else request.max_tokens
    return sorted({b for b in buckets if b < longest} | {longest})


def _tokens_covering(tokenizer, tokens: list[int], n_chars: int) -> int:
    """The fewest leading tokens whose text reaches n_chars characters."""
    for k in range(len(tokens) + 1):
        if len(tokenizer.decode(tokens[:k])) >= n_chars:
            return k
    return len(tokens)


def _whole_characters(text: str, request: CompletionRequest) -> str:
    """`text` up to its last complete character. A byte-level token cut inside a character
    (or bytes that make none) decode to U+FFFD: the candidate ends before the first one,
    unless the context itself holds U+FFFD (then the model may be copying it)."""
    broken = text.find("\ufffd")
    if broken == -1 or "\ufffd" in request.prefix or "\ufffd" in request.suffix:
        return text
    return text[:broken]


def _encode(tokenizer, text: str, what: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except (TypeError, ValueError, UnicodeError) as exc:  # e.g. lone surrogates from a client
        raise EngineInputError(
            f"bad completion request: {what} cannot be tokenized ({exc})") from None


class Engine:
    def __init__(self, loaded, *, model_spec: str, quant: str, load_ms: float,
                 static_shapes: bool | None = None, cuda_graphs: bool | None = None,
                 context_reuse: bool = True, context_cache_bytes: int | None = None,
                 max_reuses: int = DEFAULT_MAX_REUSES, max_changed: int = DEFAULT_MAX_CHANGED,
                 speculate: bool = True, refresh_worn: bool = True, concurrent: bool = True,
                 max_batch_rows: int | None = None):
        """static_shapes: fixed-shape passes (default on CUDA: no host sync inside the loop);
        cuda_graphs: replay those passes as CUDA graphs (default on CUDA).
        context_reuse: keep recent contexts' K/V (context_cache_bytes of them; default 256 MiB
        on the CPU, 1 GiB on a GPU: about 9 2k-token contexts of a 7B model) and reuse them
        across requests, at most max_reuses hops from a full encode and only when at most
        max_changed context tokens changed; refresh_worn: when a request's context is
        max_reuses hops from a full encode, encode it afresh when idle, so the next request
        stays warm; speculate: prepare the accepted completion's context when idle (both need
        context_reuse and concurrent).
        concurrent: requests from several threads share passes on one worker thread; False
        runs each call on its caller's thread, one at a time (nothing in the background then).
        max_batch_rows: rows in one shared pass (default 32 on the CPU, 16 on fixed shapes)."""
        self._loaded = loaded
        self._spec = model_spec
        self._quant = quant
        self._load_ms = load_ms
        self._lock = threading.Lock()  # serialises calls when not concurrent, and close()
        tok = loaded.tokenizer
        ends = {loaded.args.eos_token_id, loaded.args.pad_token_id, tok.eos_id, tok.pad_id}
        dlm_pad = tok.backend.token_to_id(DIFFUCODER_PAD)
        if dlm_pad is not None:
            ends.add(dlm_pad)
        self._end_ids = ends
        # Never written into a hole: MASK itself (a tied head happily predicts its input) and
        # embedding rows past the tokenizer (padding in published checkpoints, never trained).
        # EXPAND only means something to DreamOn's own loop.
        args = loaded.args
        banned = {args.mask_token_id, *range(tok.vocab_size, args.vocab_size)}
        self._banned_fixed = torch.tensor(sorted(banned), device=loaded.device)
        expand = args.expand_token_id if args.expand_token_id is not None else tok.expand_id
        banned_all = banned | ({expand} if expand is not None else set())
        self._banned_all = torch.tensor(sorted(banned_all), device=loaded.device)
        on_cuda = loaded.device.type == "cuda"
        static = on_cuda if static_shapes is None else static_shapes
        graphs = on_cuda if cuda_graphs is None else cuda_graphs and on_cuda
        self._passes = PassCache(loaded.model, args, loaded.dtype, loaded.device,
                                 self._banned_all, use_graphs=graphs) if static else None
        if context_cache_bytes is None:
            context_cache_bytes = GPU_CONTEXT_CACHE_BYTES if on_cuda else DEFAULT_BUDGET_BYTES
        self._cache = ContextCache(context_cache_bytes, max_reuses, max_changed) \
            if context_reuse else None
        self._speculate = speculate and context_reuse and concurrent
        self._refresh_worn = refresh_worn and context_reuse and concurrent
        self.prewarms = 0  # contexts encoded ahead of a request (prewarm)
        self._loop = DenoiseLoop(loaded.model, args, passes=self._passes, cache=self._cache,
                                 dtype=loaded.dtype, banned_ids=self._banned_all)
        budget = max_batch_rows or (BATCH_BUCKETS[-1] if static else CPU_BATCH_ROWS)
        if static:
            budget = min(budget, BATCH_BUCKETS[-1])
        share = budget - budget // 4 if static else min(budget, MAX_JOB_ROWS_CPU)
        self._worker = BatchWorker(self._loop, budget, max_job_rows=share) if concurrent else None
        self.check_every: int | None = None  # steps between host reads (None: the default)

    @classmethod
    def load(
        cls, model: str, *, device: str = "cpu", quant: str = "none", dtype: str | None = None,
        static_shapes: bool | None = None, cuda_graphs: bool | None = None, warm: bool = True,
        **options,
    ) -> Engine:
        """Load a checkpoint. On CUDA (warm=True) the common pass shapes are captured as
        graphs before this returns, so the first requests do not pay for it. `options`: the
        constructor's (context_reuse, context_cache_bytes, speculate, concurrent, ...)."""
        from engine.model.weights import DTYPES, load_model

        if quant not in get_args(QuantMode):
            raise EngineError(f"unknown quant mode {quant!r} ({', '.join(get_args(QuantMode))})")
        if dtype is not None and dtype not in DTYPES:
            raise EngineError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
        started = time.perf_counter()
        loaded = load_model(model, device=device, dtype=DTYPES.get(dtype), quant=quant)
        engine = cls(loaded, model_spec=model, quant=quant, load_ms=0.0,
                     static_shapes=static_shapes, cuda_graphs=cuda_graphs, **options)
        if warm:
            engine.warm_up()
        engine._load_ms = (time.perf_counter() - started) * 1000.0
        return engine

    def warm_up(self) -> list[tuple[int, int, int, int]]:
        """Capture the pass shapes most requests use (CUDA graphs only); returns them. They are
        captured on the thread that runs every pass (the worker's, when there is one)."""
        loaded = self._require()
        if self._passes is None or not self._passes.use_graphs:
            return []
        # The join shape too: the first pass of a request whose context came from the cache.
        refresh = (0, REFRESH_BUCKETS[0]) if self._cache is not None else (0,)

        def capture() -> None:
            self._passes.warm_up(common_layouts(loaded.args), refresh)

        if self._worker is not None:
            try:
                self._worker.run_exclusive(capture)
            except WorkerClosed:
                raise EngineError("the engine is closed") from None
        else:
            with self._lock, torch.inference_mode():
                capture()
        return self._passes.shapes

    @property
    def graph_failures(self) -> list[str]:
        """Pass shapes whose CUDA graph capture failed (they run eagerly)."""
        return [] if self._passes is None else list(self._passes.failures)

    def use_cpu_threads(self) -> int:
        """For a process that serves this engine: set torch's CPU thread count and return it.
        MASKFILL_CPU_THREADS or OMP_NUM_THREADS when set; else 1 for a small model on CPU; else
        torch's default."""
        loaded = self._require()
        chosen = os.environ.get(CPU_THREADS_ENV) or os.environ.get("OMP_NUM_THREADS")
        if chosen and chosen.strip().isdigit() and int(chosen) > 0:
            torch.set_num_threads(int(chosen))
        elif loaded.device.type == "cpu" and parameter_count(loaded.model) < \
                SINGLE_THREAD_BELOW_PARAMS:
            torch.set_num_threads(1)
        return torch.get_num_threads()

    @property
    def tokenizer(self):
        return self._require().tokenizer

    @property
    def args(self):
        return self._require().args

    def info(self) -> EngineInfo:
        loaded = self._require()
        model = loaded.model
        return EngineInfo(
            model=self._spec,
            path=str(loaded.path),
            family=loaded.args.family,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            quant=self._quant,
            weight_bytes=weight_bytes(model),  # quantized tensors are buffers: count those too
            parameters=parameter_count(model),
            max_context=loaded.args.max_context,
            load_ms=self._load_ms,
        )

    @property
    def concurrent_calls(self) -> bool:
        """EngineLike: calls from several threads share passes (concurrent=True)."""
        return self._worker is not None

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until the worker has nothing left to do, background work (refresh,
        speculation) included (tests and benchmarks use it to start from a settled engine).
        True when it settled in time."""
        return self._worker.wait_idle(timeout) if self._worker is not None else True

    def context_stats(self) -> dict[str, int]:
        """The context cache's counters (all 0 when reuse is off) and the batch figures."""
        cache, worker = self._cache, self._worker
        out = dict(hits=0, misses=0, speculative_hits=0, speculative_drops=0, refreshes=0,
                   evictions=0, entries=0, bytes=0)
        if cache is not None:
            out.update(hits=cache.hits, misses=cache.misses, evictions=cache.evictions,
                       speculative_hits=cache.speculative_hits,
                       speculative_drops=cache.speculative_drops, refreshes=cache.refreshes,
                       entries=len(cache), bytes=cache.nbytes)
        if worker is not None:
            out.update(shared_passes=worker.passes, peak_batch_rows=worker.peak_rows,
                       idle_interrupted=worker.interrupted)
        return out

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
        with self._lock:
            if self._cache is not None:
                self._cache.clear()
            loaded, self._loaded = self._loaded, None
            if loaded is not None and loaded.device.type == "cuda":
                del loaded
                gc.collect()
                torch.cuda.empty_cache()

    def complete(
        self, request: CompletionRequest, cancel: threading.Event | None = None,
        on_draft: Callable[[Draft], None] | None = None,
    ) -> CompletionResult:
        """Fill the hole between request.prefix and request.suffix.

        Cancelled (the event is set, checked between steps): returns within one step with
        stats.cancelled, text "" and no candidates. Timed out (request.timeout_ms): returns the
        best so far with stats.timed_out, each row cut at its first still-masked slot, so the
        text holds only tokens the model actually committed (possibly ""). Safe to call from
        several threads: concurrent calls share passes (the deadline counts the wait too).

        on_draft: told the partial fill at the denoising loop's host reads
        (engine/denoise/drafts.py),
        from another thread, every call before this one returns (DreamOn's expanding loop
        gives none)."""
        started = time.perf_counter()
        stop = StopSignal(
            cancel=cancel,
            deadline=None if request.timeout_ms is None
            else time.monotonic() + request.timeout_ms / 1000.0,
        )
        loaded = self._require()
        validate(request, loaded.args.max_context)
        args = loaded.args
        stats = CompletionStats()
        if stop.cancelled():
            stats.cancelled = True
            return CompletionResult(text="", candidates=[], stats=stats)

        lengths = hole_lengths(request)
        expanding = args.variant == "dreamon" and args.expand_token_id is not None
        if expanding:
            lengths = [request.span_lengths[0] if request.span_lengths
                       else min(DREAMON_INITIAL_HOLE, request.max_tokens)]
        budget = fim.context_budget(args, request.max_tokens if expanding else max(lengths),
                                    request.max_context_tokens)
        if budget < 0:
            raise EngineInputError(
                f"bad completion request: a {max(lengths)}-token hole and the special tokens "
                f"do not fit a {request.max_context_tokens or args.max_context}-token window"
            )
        prefix_ids, suffix_ids = self._context_ids(request.prefix, request.suffix, budget,
                                                   request.extra)
        stats.prefix_tokens, stats.suffix_tokens = len(prefix_ids), len(suffix_ids)
        tokenized = time.perf_counter()

        seed = request.seed if request.seed is not None else secrets.randbits(62)
        context = None  # (lead, tail) of the batch the buckets ran: what speculation follows
        try:
            if expanding:
                done, rows = self._denoise_expanding(
                    loaded, request, prefix_ids, suffix_ids, lengths[0], seed, stop)
            else:
                done, rows, context = self._denoise_buckets(
                    loaded, request, prefix_ids, suffix_ids, lengths, seed, stop, on_draft)
        except torch.OutOfMemoryError:
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            raise EngineError(
                f"out of memory on {loaded.device} for {len(lengths)} hole row(s) and "
                f"{len(prefix_ids) + len(suffix_ids)} context tokens; lower max_tokens, "
                "num_candidates or max_context_tokens"
            ) from None
        if done is None:  # cancelled, or past its deadline, before it reached the model
            stats.cancelled = stop.cancelled()
            stats.timed_out = not stats.cancelled
            return CompletionResult(text="", candidates=[], stats=stats)
        denoised = time.perf_counter()
        stats.forward_passes = done.forward_passes
        stats.cancelled, stats.timed_out = done.cancelled, done.timed_out
        stats.reused_context_tokens = done.reused_tokens
        stats.speculative_hit = done.speculative_hit
        stats.batch_rows = done.batch_rows
        if done.cancelled:  # the caller no longer wants it: nothing partial is ranked or returned
            stats.timings_ms = {"tokenize": (tokenized - started) * 1000.0,
                                "encode": done.encode_ms, "denoise": done.denoise_ms,
                                "total": (denoised - started) * 1000.0}
            return CompletionResult(text="", candidates=[], stats=stats)
        candidates, best_row = self._rank(request, done, rows)
        finished = time.perf_counter()
        if best_row is not None:
            stats.tokens_committed_per_step = done.commits[best_row]
            stats.padded_tokens = int(done.forced[best_row].sum())
            stats.span_length = rows[best_row]
        if candidates:
            stats.mean_confidence = candidates[0].mean_confidence
        stats.timings_ms = {
            "tokenize": (tokenized - started) * 1000.0,
            "encode": done.encode_ms,
            "denoise": done.denoise_ms,
            "decode": (finished - denoised) * 1000.0,
            "total": (finished - started) * 1000.0,
        }
        text = candidates[0].text if candidates else ""
        if text and not done.timed_out and context is not None and request.use_cache:
            self._speculate_on(request, text, context, max(lengths))
        return CompletionResult(text=text, candidates=candidates, stats=stats)

    # ---- internals --------------------------------------------------------------------------

    def _require(self):
        if self._loaded is None:
            raise EngineError("the engine is closed")
        return self._loaded

    def _context_ids(self, prefix: str, suffix: str, budget: int,
                     extra: tuple = ()) -> tuple[list[int], list[int]]:
        """Token ids of the text before and after the hole, cut to `budget` tokens. The
        extra context (engine/denoise/repo_context.py) goes before the prefix: whole chunks within
        half the budget (the caller sized it: the server adds its extra budget to the
        window), the file's own text in the rest."""
        tok = self._require().tokenizer
        lead = extra_ids(tok, extra, max(budget, 0) // 2) if extra else []
        budget -= len(lead)
        prefix, suffix = fim.precut_text(prefix, suffix, budget)
        prefix_ids, suffix_ids = fim.context_near_hole(
            lambda text: _encode(tok, text, "the text around the hole"), prefix, suffix, budget)
        return lead + prefix_ids, suffix_ids

    def _run(self, job: DenoiseJob) -> Denoised | None:
        """Denoise on the worker (sharing passes), or here when not concurrent: the same loop
        driver either way (engine/denoise/loop.py)."""
        try:
            if self._worker is not None:
                return self._worker.run(job)
        except WorkerClosed:
            raise EngineError("the engine is closed") from None
        with self._lock:
            self._require()
            return run_alone(self._loop, job)

    def _speculate_on(self, request: CompletionRequest, text: str,
                      context: tuple[torch.Tensor, torch.Tensor], hole: int) -> None:
        """When the worker is idle: the context as if `text` were accepted, into the cache,
        beside the hole the next request will use (engine/denoise/speculation.py). `context`
        (its batch's (lead, tail) ids) and `hole`: this request's context, which the
        speculation follows."""
        if not self._speculate or self._worker is None or self._loaded is None:
            return
        accepted = request.prefix + text
        predicted = replace(request, prefix=accepted, stop=stop_after_accepting(
            request.stop, request.prefix, request.suffix, text))
        holes = [max(hole_lengths(predicted))]
        if hole not in holes:
            # The stop may be a fixed setting that only agreed with the automatic rule here (an
            # HTTP client's `block`): its next request asks for this hole again. Grown from
            # this context, that speculation is one step-sized pass.
            holes.append(hole)
        for rank, next_hole in enumerate(holes):
            self._worker.when_idle(self._speculation(request, accepted, next_hole, context, hole),
                                   key=("speculate", rank))
        for rank in range(len(holes), 2):  # an older request's second one is moot now
            self._worker.when_idle(None, key=("speculate", rank))

    def _speculation(self, request: CompletionRequest, accepted: str, next_hole: int,
                     context: tuple[torch.Tensor, torch.Tensor], hole: int
                     ) -> Callable[[], None]:
        """The idle task that speculates (accepted, request.suffix) beside a `next_hole` hole."""
        loaded, cache = self._loaded, self._cache
        budget = fim.context_budget(loaded.args, next_hole, request.max_context_tokens)

        def task() -> None:
            if self._loaded is None or budget < 0:
                return
            follows = None
            if next_hole != hole:  # nothing of this hole length to grow from: say what it follows
                follows = cache.find(*context, hole)
                if follows is None:  # evicted, or superseded: nobody is at that cursor now
                    return
            next_prefix, next_suffix = self._context_ids(accepted, request.suffix, budget,
                                                         request.extra)
            speculate_accepted(loaded.model, loaded.args, cache, next_prefix, next_suffix,
                               next_hole, self._banned_all, loaded.dtype, loaded.device,
                               follows=follows)

        return task

    def prewarm(self, request: CompletionRequest) -> bool:
        """When the worker is idle: encode `request`'s context into the cache (no denoising),
        so that the next request sharing its start (a new extra-context block, issue 23)
        starts warm; llama.vim's `n_predict: 0` request does the same for llama-server.
        False when there is nothing to warm (no worker or no context reuse)."""
        loaded = self._loaded
        if self._worker is None or self._cache is None or loaded is None:
            return False
        validate(request, loaded.args.max_context)
        hole = max(hole_lengths(request))
        budget = fim.context_budget(loaded.args, hole, request.max_context_tokens)
        if budget < 0:
            return False
        cache = self._cache

        def task() -> None:
            if self._loaded is None:
                return
            prefix_ids, suffix_ids = self._context_ids(request.prefix, request.suffix, budget,
                                                       request.extra)
            batch = fim.build_infill_batch(loaded.args, prefix_ids, suffix_ids, [hole],
                                           loaded.device)
            lead, tail = context_ids(batch)
            if cache.find(lead, tail, hole) is not None:
                return
            cache.put(entry_alone(loaded.model, loaded.args, batch, self._banned_all, None,
                                  loaded.dtype, loaded.device))
            self.prewarms += 1

        self._worker.when_idle(task, key="prewarm")
        return True

    def _refresh_if_worn(self, context: tuple[torch.Tensor, torch.Tensor], hole: int,
                         request: CompletionRequest) -> None:
        """When the context this request left in the cache is worn (max_reuses hops from a
        full encode): encode it afresh when the worker is idle, ahead of any speculation (it
        may grow from the fresh entry; engine/denoise/context_refresh.py)."""
        if not self._refresh_worn or not request.use_cache or self._loaded is None:
            return
        loaded, cache = self._loaded, self._cache
        worn = cache.find(*context, hole)
        if worn is None or worn.reuses == 0 or not cache.worn(worn):
            return  # (0 hops: max_reuses 0 turns reuse off; a fresh encode would change nothing)

        def task() -> None:
            if self._loaded is not None:
                refresh_context(loaded.model, loaded.args, cache, worn, self._banned_all,
                                loaded.dtype, loaded.device)

        self._worker.when_idle(task, key=worn, first=True)

    def _denoise_buckets(self, loaded, request, prefix_ids, suffix_ids, lengths, seed, stop,
                         on_draft=None):
        """The job is built on the CPU and moved to the device by the thread that runs the
        model (DenoiseLoop.start), which hands back a CPU result: this caller's thread never
        touches the device, where that thread may be capturing a CUDA graph."""
        rows: list[int] = []
        temperatures: list[float] = []
        for candidate in range(request.num_candidates):
            hot = request.temperature if request.temperature > 0 else EXTRA_CANDIDATE_TEMPERATURE
            for n in lengths:
                rows.append(n)
                temperatures.append(request.temperature if candidate == 0 else hot)
        batch = fim.build_infill_batch(loaded.args, prefix_ids, suffix_ids, rows)
        # Drafts follow the first candidate's longest row: the span budget, the most text.
        feed = None if on_draft is None else DraftFeed(
            len(lengths) - 1, rows[len(lengths) - 1], request, tokenizer=loaded.tokenizer,
            mask_id=loaded.args.mask_token_id, end_ids=self._end_ids, on_draft=on_draft)
        job = DenoiseJob(
            batch, request, temperatures=temperatures, end_ids=torch.tensor(sorted(self._end_ids)),
            banned_ids=self._banned_all, generator=None, seed=seed, stop=stop,
            decided=None if request.stop == "free" else self._stop_decides(request),
            check_every=self.check_every, on_read=None if feed is None else feed.offer)
        try:
            done = self._run(job)
        finally:
            if feed is not None:
                feed.close()
        if done is None:
            return None, rows, None
        # The (lead, tail) ids of the longest row: what its first pass left in the cache
        # (cancelled or not), and what a speculation after it follows (the same ids and hole
        # as a one-row batch of this context: no rebuild on the idle queue).
        context = context_ids(batch)
        self._refresh_if_worn(context, batch.max_hole, request)
        return done, rows, context

    def _stop_decides(self, request: CompletionRequest):
        """A row whose committed run from its first slot is already cut by the stop mode needs
        no more passes: whatever fills its later slots, apply_stop drops it."""
        tok, mask_id = self._loaded.tokenizer, self._loaded.args.mask_token_id

        def decided(run: list[int]) -> bool:
            tokens, _ = fim.trim_at_end(run, self._end_ids, mask_id)
            text = tok.decode(tokens)
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                return False
            return len(apply_stop(text, request.stop, request.prefix)) < len(text)

        return decided

    def _denoise_expanding(self, loaded, request, prefix_ids, suffix_ids, initial, seed, stop):
        args = loaded.args
        batch = fim.build_infill_batch(args, prefix_ids, suffix_ids, [1], "cpu")
        lead = batch.ids[0, : batch.hole_start].tolist()
        tail = batch.ids[0, batch.hole_start + 1:].tolist()
        window = args.max_context if request.max_context_tokens is None else min(
            args.max_context, request.max_context_tokens)
        def run() -> Denoised:  # on the model's thread: the device is touched only there
            generator = torch.Generator(loaded.device).manual_seed(seed)
            return denoise_expanding(
                loaded.model, args, lead, tail, request, initial_length=initial, window=window,
                temperature=request.temperature, generator=generator, stop=stop,
                device=loaded.device, end_ids=self._end_ids, banned_ids=self._banned_fixed,
            )

        if self._worker is not None:  # its own loop: it runs with nothing else in flight
            done = self._worker.run_exclusive(run)
        else:
            with self._lock, torch.inference_mode():
                done = run()
        return done, [int(done.hole.shape[1])]

    def _rank(self, request: CompletionRequest, done: Denoised, rows: list[int]):
        """Trim every row at its first end token, apply the stop mode, rank, drop duplicates.

        After the lead row (below), rows an end token closed before their last slot rank first
        (a row that used every slot was probably cut short), then the mean probability of the
        tokens the model committed (forced EOS padding excluded). Confidence alone picked
        truncated short rows for whole bodies on the memorized model (docs/LOG.md)."""
        tok = self._loaded.tokenizer
        mask_id = self._loaded.args.mask_token_id
        holes = done.hole.tolist()
        confidences = done.confidence.tolist()
        forced = done.forced.tolist()
        scored: list[tuple[tuple[bool, float], int, Candidate]] = []
        for r, length in enumerate(rows):
            tokens, ended = fim.trim_at_end(holes[r][:length], self._end_ids, mask_id)
            decoded = tok.decode(tokens)
            written = _whole_characters(decoded, request)
            if len(written) < len(decoded):  # cut inside a character: it ranks as unfinished
                tokens, ended = tokens[:_tokens_covering(tok, tokens, len(written))], False
            text = apply_stop(written, request.stop, request.prefix)
            cut = len(text) < len(written)
            if cut:  # the stop mode closed it: rank it on what it keeps, as ended
                tokens = tokens[:_tokens_covering(tok, tokens, len(text))]
            used = min(len(tokens) + (1 if ended or cut else 0), length)
            probs = [c for c, f in zip(confidences[r][:used], forced[r][:used], strict=True)
                     if not f]
            mean_conf = sum(probs) / len(probs) if probs else 0.0
            cand = Candidate(text=text, mean_confidence=mean_conf, span_length=length,
                             ended=cut or (ended and len(tokens) < length))
            scored.append(((cand.ended, mean_conf), r, cand))
        # At T = 0 only the first len(rows) / num_candidates rows are greedy (the extras are
        # sampled hot): the best greedy row leads, so a manual request's top pick is the
        # automatic answer, and the sampled candidates follow in rank order.
        lead = None
        if request.temperature == 0:
            primary = max(1, len(rows) // request.num_candidates)
            lead = max((item for item in scored if item[1] < primary), key=lambda item: item[0])
        scored.sort(key=lambda item: (item is lead, item[0]), reverse=True)
        seen: set[str] = set()
        candidates: list[Candidate] = []
        best_row = scored[0][1] if scored else None
        for _, _, cand in scored:
            if cand.text in seen:
                continue
            seen.add(cand.text)
            candidates.append(cand)
        if request.all_rows:
            return candidates, best_row
        return candidates[: request.num_candidates], best_row
