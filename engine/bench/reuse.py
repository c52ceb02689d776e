"""`make bench` figures of Engine speed III: warm contexts, shared passes, the keystroke replay.

- warm_vs_cold_speedup: a request whose context is warm from the keystroke before (one prefix
  token changed) against the same request encoded from scratch; the small shape (random
  weights), 2k-token context, fixed 8-pass requests, the CPU's default (shrinking) path.
- batch8_throughput_ratio: 8 requests (8 documents, each warm from its last keystroke) served
  in one loop, sharing every pass, against the same 8 served one after another; same shape and
  context. Also at the server's default window (1024 tokens) and 512, and with cold contexts
  (each encoded from scratch). What a shared pass cannot share on a CPU is attention: each
  request's queries attend over its own context, so the ratio falls as the context grows.
- the keystroke replay (engine/bench/keystroke_replay.py) on the embedded model: reuse_hit_rate,
  cold and warm latency p50 of the requests that completed in real time, and the accept scenario;
  then the same requests paired (replay_paired_*): each on an engine with context reuse and one
  without, back to back, which is what reuse buys per request.
- (engine/bench/suite.py, with the server) the replay on a virtual clock, deterministic,
  without and with the server's stable block from three other open files:
  reuse_hit_rate_{without,with}_files and reuse_token_share_{without,with}_files
  (lsp_server/context/replay.py).

Measured, never asserted (tests check behaviour).
"""

from __future__ import annotations

import statistics
import time

import torch

from engine.api import CompletionRequest
from engine.denoise.context_cache import ContextCache
from engine.denoise.loop import DenoiseJob, DenoiseLoop, StopSignal

CONTEXT = 2048
EDITOR_CONTEXT = 1024  # the server's default context window (context_tokens in its settings)
BATCH = 8


def _request() -> CompletionRequest:
    from engine.bench.shapes import HOLE, REQUEST_STEPS

    return CompletionRequest(prefix="", suffix="", span_lengths=(HOLE,), max_tokens=HOLE,
                             sampler="maskgit_plus", steps=REQUEST_STEPS, stop="free", seed=0)


def _job(work, batch) -> DenoiseJob:
    return DenoiseJob(batch, _request(), [0.0], work.banned[1:2], work.banned,
                      torch.Generator(work.device).manual_seed(0), StopSignal())


@torch.inference_mode()
def bench_warm_vs_cold(device: torch.device, reps: int) -> dict[str, float]:
    from engine.bench.shapes import (
        Workload,
        build_random,
        small_random_args,
        time_ms,
        warm_requests,
    )

    args = small_random_args()
    model = build_random(args, device, torch.float32)
    work = Workload(args, device, context=CONTEXT)
    cold = time_ms(lambda: work.run(model, None), device, reps)
    warm = warm_requests(model, work, None, device, reps)
    return {"cold_request_ms_p50": statistics.median(cold),
            "warm_request_ms_p50": statistics.median(warm),
            "warm_vs_cold_speedup": statistics.median(cold) / statistics.median(warm)}


@torch.inference_mode()
def batch_times(model, args, device, context: int, warm: bool, reps: int,
                static: bool = False) -> tuple[float, float]:
    """Seconds for BATCH requests served one by one, and sharing passes (best of reps each,
    alternating, so load on the machine hits both alike). static: fixed-shape passes (the
    CUDA path, run eagerly) instead of the CPU's shrinking ones."""
    from engine.bench.shapes import Workload
    from engine.denoise.graphs import PassCache

    works = [Workload(args, device, context=context, seed=1 + i) for i in range(BATCH)]
    cache = ContextCache(budget_bytes=1 << 34, max_reuses=1 << 30) if warm else None
    passes = PassCache(model, args, torch.float32, device, works[0].banned,
                       use_graphs=device.type == "cuda") if static else None
    loop = DenoiseLoop(model, args, passes=passes, cache=cache, banned_ids=works[0].banned)
    if warm:
        for w in works:
            loop.turn([(_job(w, w.batch), None)])
            while loop.active:
                loop.turn([])
    keystroke = [11]

    def batches():
        keystroke[0] = 23 - keystroke[0]  # alternate, so each request is one keystroke later
        return [w.typed(keystroke[0]) if warm else w.batch for w in works]

    def one_by_one():
        for w, b in zip(works, batches(), strict=True):
            loop.turn([(_job(w, b), None)])
            while loop.active:
                loop.turn([])

    def together():
        loop.turn([(_job(w, b), None) for w, b in zip(works, batches(), strict=True)])
        while loop.active:
            loop.turn([])

    best = {one_by_one: float("inf"), together: float("inf")}
    for _ in range(reps):
        for fn in best:
            started = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - started)
    return best[one_by_one], best[together]


def _batch_ratio(model, args, device, context: int, warm: bool, reps: int) -> float:
    alone, shared = batch_times(model, args, device, context, warm, reps)
    return alone / shared


def bench_batch(device: torch.device, reps: int) -> dict[str, float]:
    from engine.bench.shapes import build_random, small_random_args

    args = small_random_args()
    model = build_random(args, device, torch.float32)
    return {
        "batch8_throughput_ratio": _batch_ratio(model, args, device, CONTEXT, True, reps),
        "batch8_throughput_ratio_1024": _batch_ratio(model, args, device, EDITOR_CONTEXT, True,
                                                     reps),
        "batch8_throughput_ratio_512": _batch_ratio(model, args, device, 512, True, reps),
        "batch8_cold_throughput_ratio": _batch_ratio(model, args, device, CONTEXT, False, 1),
    }


def bench_replay(device: torch.device) -> dict[str, float]:
    """The keystroke replay and the accept scenario on the embedded model (one CPU thread, as
    the server runs it)."""
    from engine.bench.keystroke_replay import accept_scenario, paired, replay
    from engine.engine import Engine
    from engine.model.embedded_model import default_model_path

    path = default_model_path()
    if path is None:
        return {}
    threads = torch.get_num_threads()
    engine = Engine.load(str(path), device=str(device))
    sent: list = []
    try:
        engine.use_cpu_threads()
        out = replay(engine, sent_requests=sent)
        out.update(accept_scenario(engine))
        stats = engine.context_stats()
        out["replay_peak_batch_rows"] = stats.get("peak_batch_rows", 0)
    finally:
        engine.close()
    # The same requests again, paired: fresh engines (nothing cached from the replay), one with
    # context reuse and one without.
    warm = Engine.load(str(path), device=str(device))
    cold = Engine.load(str(path), device=str(device), context_reuse=False)
    try:
        warm.use_cpu_threads()
        out.update(paired(warm, cold, sent))
    finally:
        warm.close()
        cold.close()
        torch.set_num_threads(threads)
    return out
