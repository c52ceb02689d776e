"""`python -m engine bench`: engine (and server) speed and memory: a table, then one JSON line.

Figures are measured in one run and compared as ratios, so a slower or busier machine shifts them
together. Nothing here asserts: tests check behaviour, this file only measures.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.api import EngineError
from engine.config import ModelArgs
from engine.model import Transformer

SPAN = 32
CONTEXTS = (512, 2048)


def small_random_args(vocab: int = 8192) -> ModelArgs:
    """A small Dream-shaped model: big enough that matmuls, not Python, dominate a step on CPU."""
    return ModelArgs(
        family="dream", variant="dream", vocab_size=vocab, dim=256, n_layers=4, n_heads=8,
        n_kv_heads=2, head_dim=32, ffn_dim=768, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
        tie_embeddings=False, logit_shift=True, max_context=4096, infill_bos=True, infill_eos=True,
        mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
        bos_token_id=vocab - 3, expand_token_id=None, torch_dtype="float32",
    )


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of fn in milliseconds after one warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


@torch.inference_mode()
def _bench_context(
    model: Transformer, ctx: int, device: torch.device, reps: int
) -> dict[str, float]:
    """Encode, uncached step and cached step for one context length and a SPAN-token hole."""
    args = model.args
    n = ctx + SPAN
    ids = torch.randint(0, args.vocab_size - 3, (1, n), device=device)
    start = ctx // 2
    ids[0, start : start + SPAN] = args.mask_token_id
    pos = torch.arange(n, device=device)[None]
    valid = torch.ones(1, n, dtype=torch.bool, device=device)
    # Shifted model: the last prefix token is a query too, and predicts the first hole slot.
    rows = torch.arange(start - 1, start + SPAN, device=device)
    _, cache = model.encode(ids, pos, valid)
    ctx_valid = valid.clone()
    ctx_valid[0, rows] = False  # query rows bring their own fresh K/V
    q_valid = torch.ones(1, rows.numel(), dtype=torch.bool, device=device)

    def uncached() -> torch.Tensor:  # the reference path: a full forward every step
        return model.output(model(ids, pos, valid)[:, rows[:-1]])

    def cached() -> torch.Tensor:
        hidden = model.step(ids[:, rows], pos[:, rows], q_valid, cache, ctx_valid)
        return model.output(hidden[:, :-1])

    return {
        f"encode_ms_{ctx}": _time_ms(lambda: model.encode(ids, pos, valid), device, reps),
        f"step_ms_uncached_{ctx}": _time_ms(uncached, device, reps),
        f"step_ms_cached_{ctx}": _time_ms(cached, device, reps),
    }


def bench_steps(device: torch.device, reps: int) -> dict[str, float]:
    """Encode time and per-step time with and without the context cache, per context length."""
    torch.manual_seed(0)
    model = Transformer(small_random_args()).to(device).eval()
    out: dict[str, float] = {}
    for ctx in CONTEXTS:
        out.update(_bench_context(model, ctx, device, reps))
    return out


def bench_weight_bytes(device: torch.device) -> dict[str, float]:
    """Resident weight bytes per quant mode, against the same model held in bf16."""
    from engine.quantize import quantize_model, weight_bytes

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
    cmd = [sys.executable, "-m", "lsp_server.bench", "--model", str(path), "--device", str(device)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"(server bench failed: {proc.stderr.strip()[-300:]})", file=sys.stderr)
        return {}
    figures = json.loads(lines[-1])
    keys = ("server_overhead_ms_p50", "server_overhead_ms_p95", "round_trip_ms_p50",
            "engine_ms_p50", "model_runs_per_100_rapid_requests")
    return {k: figures[k] for k in keys if k in figures}


def run_bench(device: str = "cpu", quick: bool = False, with_server: bool = True) -> int:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EngineError(f"unknown device {device!r} (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda asked for, but torch sees no CUDA device")
    try:
        from tests.fixtures.memorized import train_memorized_checkpoint
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
    results.update(bench_weight_bytes(dev))
    with tempfile.TemporaryDirectory() as tmp:
        memorized = train_memorized_checkpoint(Path(tmp) / "memorized")
        results.update(bench_memorized(dev, memorized))
        server = bench_server(dev, memorized) if with_server else {}
        results.update(server)

    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    print(json.dumps(results))
    return 1 if with_server and not server else 0  # a failed server bench must not look green
