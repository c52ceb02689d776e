"""`python -m engine bench`: engine (and server) speed and memory: a table, then one JSON line.

Figures are measured in one run and compared as ratios, so a slower or busier machine shifts them
together. Nothing here asserts: tests check behaviour, this file only measures.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from engine.api import EngineError
from engine.bench.json_part import run_json_part
from engine.bench.shapes import small_random_args
from engine.model.embedded_model import default_model_path
from engine.model.transformer import Transformer

SPAN = 32
CONTEXTS = (512, 2048)


@torch.inference_mode()
def bench_steps(device: torch.device, reps: int) -> dict[str, float]:
    """Encode time and per-step time with and without the context cache, per context length,
    and the ATen ops one more step dispatches (the launch count a GPU would pay eagerly)."""
    from engine.bench.shapes import Workload, ops_per_pass, time_ms

    torch.manual_seed(0)
    args = small_random_args()
    model = Transformer(args).to(device).eval()
    dtype = torch.float32
    out: dict[str, float] = {}
    for ctx in CONTEXTS:
        work = Workload(args, device, context=ctx)
        static, cache = work.static_pass(model, dtype, graphs=False)
        batch = work.batch
        out[f"encode_ms_{ctx}"] = statistics.median(time_ms(
            lambda b=batch: model.encode(b.ids, b.positions), device, reps))
        out[f"step_ms_uncached_{ctx}"] = statistics.median(time_ms(
            lambda w=work: w.uncached_pass(model), device, reps))
        out[f"step_ms_cached_{ctx}"] = statistics.median(time_ms(static.logits, device, reps))
        if ctx == CONTEXTS[-1]:
            out["aten_ops_per_pass"] = ops_per_pass(model, work, cache)
            out["aten_ops_per_pass_budget"] = 20 * args.n_layers + 60
    return out


def bench_diffusion_vs_ar(device: torch.device, reps: int) -> dict[str, float]:
    """The 8-pass FIM request against transformers' 32-token generation, same shape and run."""
    from engine.bench.shapes import run_shape_bench

    shaped = run_shape_bench("small", str(device), ["none"], reps=reps, with_ar=True)
    if shaped["errors"]:
        print(f"(diffusion vs AR bench failed: {shaped['errors']})", file=sys.stderr)
        return {}
    mode = shaped["modes"][0]
    return {"fim_request_ms_p50": mode["request_ms_p50"],
            "ar_32_tokens_ms_p50": shaped["autoregressive"]["ar_ms_p50"],
            "diffusion_vs_ar_latency_ratio": shaped["diffusion_vs_ar_latency_ratio"]}


def bench_weight_bytes(device: torch.device) -> dict[str, float]:
    """Resident weight bytes per quant mode, against the same model held in bf16."""
    from engine.model.quantize import quantize_model, weight_bytes

    torch.manual_seed(0)
    base = Transformer(small_random_args(vocab=32000)).eval()
    bf16 = weight_bytes(copy.deepcopy(base).to(torch.bfloat16))
    out: dict[str, float] = {"bf16_weight_bytes": bf16}
    for mode in ("int8", "int4"):
        q = quantize_model(copy.deepcopy(base).to(torch.bfloat16), mode)
        out[f"{mode}_weight_bytes"] = weight_bytes(q.to(device))
        out[f"{mode}_weight_bytes_ratio"] = out[f"{mode}_weight_bytes"] / bf16
    return out


def bench_memorized(device: torch.device, path: Path) -> dict[str, float]:
    """Forward passes per committed token at tau = 0.9 on the memorized test model.

    Each snippet's middle third is hidden and the hole is given its true length, so the figure
    measures parallel unmasking alone, not the length heuristic."""
    from engine.api import CompletionRequest
    from engine.engine import Engine
    from tests.fixtures.memorized import SNIPPETS, split_middle

    engine = Engine.load(str(path), device=str(device))
    passes = tokens = exact = 0
    try:
        for snippet in SNIPPETS:
            n = len(engine.tokenizer.encode(snippet))
            prefix, middle, suffix = split_middle(engine.tokenizer, snippet, n // 3, 2 * n // 3)
            span = len(engine.tokenizer.encode(middle))
            result = engine.complete(CompletionRequest(
                prefix=prefix, suffix=suffix, span_lengths=(span,), max_tokens=span,
                stop="free", threshold=0.9))
            passes += result.stats.forward_passes
            tokens += result.stats.committed_tokens
            exact += result.text == middle
    finally:
        engine.close()
    return {"passes_per_token": passes / max(tokens, 1), "memorized_tokens": tokens,
            "memorized_exact": exact / len(SNIPPETS)}


def bench_server(device: torch.device, path: Path) -> dict[str, float]:
    """The LSP server's own figures, from its benchmark run as a separate process."""
    figures, _ = run_json_part([sys.executable, "-m", "lsp_server.tools.bench", "--model",
                                str(path), "--device", str(device)])
    keys = ("server_overhead_ms_p50", "server_overhead_ms_p95", "server_loop_cpu_ms_p50",
            "round_trip_ms_p50", "engine_ms_p50", "model_runs_per_100_rapid_requests")
    return {k: figures[k] for k in keys if k in figures}


def bench_reuse_with_files() -> dict[str, float]:
    """The keystroke replay on the virtual clock (deterministic: the same figures every run),
    without and with the server's stable block from three other open files: reuse_hit_rate
    and the reused share of context tokens (lsp_server/context/replay.py, a separate process:
    the engine does not import the server). The embedded model on the CPU, ~22 s of CPU."""
    figures, _ = run_json_part([sys.executable, "-m", "lsp_server.context.replay",
                                "--deterministic"])
    out = {}
    for label, name in (("without", "without_files"), ("with", "with_files")):
        out[f"reuse_hit_rate_{name}"] = figures[f"reuse_hit_rate_{label}"]
        out[f"reuse_token_share_{name}"] = figures[f"reuse_token_share_{label}"]
    return out


def bench_shared(device: torch.device, path: Path, quick: bool) -> dict:
    """Three LSP clients on one shared engine, and the loopback load test (engine/serve)."""
    from engine.bench.shared_engine import run_shared_bench

    return run_shared_bench(str(path), str(device), quick=quick)


def run_part(results: dict, name: str, part: Callable[[], dict]) -> bool:
    """Add a bench part's figures to `results`; one that fails is reported (stderr, and
    `{name}_failed` in the JSON line) and the bench goes on. True when it gave figures."""
    try:
        figures = part()
    except Exception as error:  # noqa: BLE001 - reported, and the bench exits 1
        message = f"{type(error).__name__}: {error}"
        print(f"({name} bench failed: {message})", file=sys.stderr)
        results[f"{name}_failed"] = message
        return False
    results.update(figures)
    return bool(figures)


def run_bench(device: str = "cpu", quick: bool = False, with_server: bool = True) -> int:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EngineError(f"unknown device {device!r} (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda asked for, but torch sees no CUDA device")
    try:
        from tests.fixtures.memorized import memorized_checkpoint
    except ImportError:
        raise EngineError("the bench trains the memorized test model from tests/: run it from "
                          "the repository root of a source checkout (make bench)") from None
    reps = 3 if quick else 10
    results: dict[str, float | str] = {"device": str(dev)}
    if dev.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(dev)
    results.update(bench_steps(dev, reps))
    for ctx in CONTEXTS:
        results[f"cached_step_speedup_{ctx}"] = (
            results[f"step_ms_uncached_{ctx}"] / results[f"step_ms_cached_{ctx}"])
    results["cached_step_speedup"] = results[f"cached_step_speedup_{CONTEXTS[-1]}"]
    results.update(bench_diffusion_vs_ar(dev, reps))
    results.update(bench_weight_bytes(dev))
    from engine.bench.reuse import bench_batch, bench_replay, bench_warm_vs_cold

    results.update(bench_warm_vs_cold(dev, reps))
    results.update(bench_batch(dev, 2 if quick else 3))
    results.update(bench_replay(dev))
    served = True  # the parts that run the server gave their figures
    if with_server and default_model_path() is not None:
        served &= run_part(results, "reuse_with_files", bench_reuse_with_files)
    with tempfile.TemporaryDirectory() as tmp:
        memorized = memorized_checkpoint(Path(tmp) / "memorized")
        results.update(bench_memorized(dev, memorized))
        if with_server:
            served &= run_part(results, "server", lambda: bench_server(dev, memorized))
            served &= run_part(results, "shared_engine",
                               lambda: bench_shared(dev, memorized, quick))

    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    print(json.dumps(results))
    # A failed part must not look green.
    return 0 if served else 1
