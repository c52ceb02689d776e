"""`python -m engine bench --shape {small,0.5b,7b}`: the denoising pass on a real model shape.

Random weights in the shape of a published model are built directly on the device (no
checkpoint file), so a GPU can be measured without downloading anything. Per quant mode:

- encode ms of a 2k-token context with a 32-slot hole (compute-bound);
- ms per cached pass (32-slot hole): as run (CUDA graph on CUDA) and eager;
- p50/p95 of a fixed 8-pass request (`maskgit_plus` with steps=8, end tokens banned, so random
  weights take the path a real model does);
- GPU-busy ms, kernel launches and host syncs per pass; ATen ops per pass;
- each figure's ratio to its floor (design/engine.md §1: weights read once per pass; the
  encode's FLOPs at peak), and the first pass's logit cosine against bf16;
- the autoregressive peer: transformers' `generate` for 32 tokens after the same 2k prompt with
  a static KV cache, in the same run (`diffusion_vs_ar_latency_ratio`).

Figures are measured, never asserted: a figure that cannot be measured is reported as an error
(and the run exits non-zero), so a broken GPU path is loud.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

from engine.api import CompletionRequest, one_line
from engine.bench.opcount import DispatchCounter
from engine.denoise.context_cache import ContextCache
from engine.denoise.fim import InfillBatch, build_infill_batch
from engine.denoise.graphs import PassCache
from engine.denoise.kv_arena import Layout
from engine.denoise.loop import DenoiseJob, DenoiseLoop, StopSignal, run_alone
from engine.denoise.passes import masked_head
from engine.denoise.static_batch import StaticBatch
from engine.model.config import ModelArgs
from engine.model.quantize import (
    QUANT_MODES,
    quantize_fp8_body,
    quantize_model,
    use_fast_kernels,
    weight_bytes,
)
from engine.model.transformer import Transformer

CONTEXT = 2048  # tokens around the hole
HOLE = 32
REQUEST_STEPS = 8
AR_NEW_TOKENS = 32
# Peak figures the floors are computed from: (memory bytes/s, bf16 dense FLOP/s).
# H200: 4.8 TB/s on paper, ~4.3 TB/s reached (design/engine.md §6); H100 SXM: 3.35 TB/s.
PEAKS = {"H200": (4.3e12, 790e12), "H100": (3.35e12, 989e12)}


def _dream(vocab, dim, layers, heads, kv_heads, head_dim, ffn, tie) -> ModelArgs:
    return ModelArgs(
        family="dream", variant="dream", vocab_size=vocab, dim=dim, n_layers=layers,
        n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, ffn_dim=ffn, norm_eps=1e-6,
        rope_theta=1e6, qkv_bias=True, tie_embeddings=tie, logit_shift=True,
        max_context=CONTEXT + 2 * 256, infill_bos=True, infill_eos=True,
        mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
        bos_token_id=vocab - 3, torch_dtype="bfloat16")


SHAPES: dict[str, Callable[[], ModelArgs]] = {
    # Big enough that matmuls, not Python, dominate a CPU step.
    "small": lambda: _dream(8192, 256, 4, 8, 2, 32, 768, tie=False),
    # Open-dCoder 0.5B (Qwen2.5-Coder-0.5B shape, tied head).
    "0.5b": lambda: _dream(151936, 896, 24, 14, 2, 64, 4864, tie=True),
    # Dream-Coder / DreamOn / DiffuCoder 7B (Qwen2.5-7B shape).
    "7b": lambda: _dream(152064, 3584, 28, 28, 4, 128, 18944, tie=False),
}


def build_random(args: ModelArgs, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Transformer:
    """The model with seeded random weights, built on the device in its dtype."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def quantize(model: Transformer, mode: str, device: torch.device) -> dict[str, str]:
    """Quantize in place; on CUDA switch to the fast kernels. Returns the kernels in use."""
    if mode == "fp8":
        quantize_fp8_body(model)
    elif mode != "none":
        quantize_model(model, mode)
    return use_fast_kernels(model) if device.type == "cuda" and mode != "none" else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Wall milliseconds of each of `reps` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Workload:
    """One request's tensors: `context` tokens around a 32-slot hole, batch 1."""

    def __init__(self, args: ModelArgs, device: torch.device, context: int = CONTEXT,
                 seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        prefix = torch.randint(0, args.vocab_size - 3, (context * 3 // 4,), generator=generator)
        suffix = torch.randint(0, args.vocab_size - 3, (context // 4 - 2,), generator=generator)
        self.args, self.device = args, device
        self.batch = build_infill_batch(args, prefix.tolist(), suffix.tolist(), [HOLE], device)
        self.banned = torch.tensor([args.mask_token_id, args.eos_token_id, args.pad_token_id,
                                    args.bos_token_id], device=device)  # no early ends

    def run(self, model, passes: PassCache | None, steps: int = REQUEST_STEPS,
            contexts: ContextCache | None = None, batch: InfillBatch | None = None):
        """One fixed-step request (this workload's batch, or `batch`), through the context
        cache `contexts` when given."""
        request = CompletionRequest(prefix="", suffix="", span_lengths=(HOLE,), max_tokens=HOLE,
                                    sampler="maskgit_plus", steps=steps, stop="free", seed=0)
        loop = DenoiseLoop(model, self.args, passes=passes, cache=contexts,
                           banned_ids=self.banned)
        return run_alone(loop, DenoiseJob(
            batch or self.batch, request, temperatures=[0.0], end_ids=self.banned[1:2],
            banned_ids=self.banned, generator=torch.Generator(self.device).manual_seed(0),
            stop=StopSignal()))

    def typed(self, token: int) -> InfillBatch:
        """The same context with its last prefix token replaced: the next keystroke."""
        ids = self.batch.ids[0].tolist()
        start = self.batch.hole_start
        prefix, suffix = ids[1:start], ids[start + HOLE:-1]  # without [BOS] and [EOS]
        return build_infill_batch(self.args, prefix[:-1] + [token], suffix, [HOLE], self.device)

    def static_pass(self, model, dtype: torch.dtype, graphs: bool):
        """A filled static pass for this request (captured as a graph when `graphs`)."""
        cache = PassCache(model, self.args, dtype, self.device, self.banned, use_graphs=graphs)
        layout = Layout.of(self.batch, self.args, static=True)
        batch = StaticBatch(model, self.args, cache, self.banned)
        batch.join(self.batch, layout, None, None, keep=False)
        return batch.static, cache

    def uncached_pass(self, model):
        """The reference step: a full forward, the head on the hole's predicting rows."""
        lead = self.batch.hole_start - 1
        hidden = model(self.batch.ids, self.batch.positions)
        return masked_head(model, hidden[:, lead:lead + HOLE], self.banned)


def warm_requests(model, work: Workload, passes: PassCache | None, device, reps: int
                  ) -> list[float]:
    """ms of requests whose context is warm from the one before (one prefix token changed,
    the keystroke case; the chain never refreshes, so every one is warm)."""
    contexts = ContextCache(max_reuses=1 << 30)
    work.run(model, passes, contexts=contexts)
    batches = [work.typed(token) for token in (11, 12)]
    count = iter(range(1 << 30))
    return time_ms(lambda: work.run(model, passes, contexts=contexts,
                                    batch=batches[next(count) % 2]), device, reps)


def ops_per_pass(model, work: Workload, cache: PassCache) -> float:
    """ATen ops one more denoising step dispatches (its pass, sampling and commit): two
    requests that differ only in their step count, so set-up cancels out."""
    counts = []
    for steps in (4, 12):
        with DispatchCounter() as counted:
            work.run(model, cache, steps=steps)
        counts.append(counted.ops)
    return (counts[1] - counts[0]) / 8


@torch.inference_mode()
def bench_mode(args: ModelArgs, device: torch.device, dtype: torch.dtype, mode: str,
               reps: int, reference_logits: torch.Tensor | None) -> dict:
    """Every figure for one quant mode; the model is built and measured here."""
    out: dict = {"quant": mode}
    model = build_random(args, device, dtype)
    out["kernels"] = quantize(model, mode, device)
    embedding = model.tok_embeddings
    table = sum(t.numel() * t.element_size() for t in embedding.buffers()) + \
        sum(p.numel() * p.element_size() for p in embedding.parameters())
    tied = args.tie_embeddings
    out["weight_bytes"] = weight_bytes(model)
    # A pass reads every weight but the embedding table (a gather), plus the context's K/V.
    kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2 * (CONTEXT + HOLE + 2)
    out["pass_bytes"] = out["weight_bytes"] - (0 if tied else table) + kv_bytes
    work = Workload(args, device)
    batch = work.batch
    is_cuda = device.type == "cuda"

    out["encode_ms"] = statistics.median(time_ms(
        lambda: model.encode(batch.ids, batch.positions), device, reps))
    graphed, cache = work.static_pass(model, dtype, graphs=is_cuda)
    out["graphed"] = graphed.graphed
    if cache.failures:
        out["error_graph_capture"] = "; ".join(cache.failures)
    out["pass_ms"] = statistics.median(time_ms(graphed.logits, device, 3 * reps))
    first = graphed.logits()[0, :HOLE].float().cpu()
    if reference_logits is None:
        out["first_pass_logits"] = first
    else:
        finite = torch.isfinite(reference_logits) & torch.isfinite(first)  # banned ids: -inf
        out["logit_cosine_vs_bf16"] = torch.nn.functional.cosine_similarity(
            first[finite].double(), reference_logits[finite].double(), dim=0).item()
    eager, _ = work.static_pass(model, dtype, graphs=False)
    out["pass_ms_eager"] = statistics.median(time_ms(eager.logits, device, reps))
    with DispatchCounter() as counted:
        eager.logits()
    out["aten_ops_per_model_pass"] = counted.ops
    out["pass_ms_uncached"] = statistics.median(time_ms(
        lambda: work.uncached_pass(model), device, reps))

    requests = time_ms(lambda: work.run(model, cache), device, max(5, 2 * reps))
    out["request_ms_p50"] = statistics.median(requests)
    out["request_ms_p95"] = percentile(requests, 0.95)
    warm = warm_requests(model, work, cache, device, max(5, 2 * reps))
    out["warm_request_ms_p50"] = statistics.median(warm)
    out["warm_request_ms_p95"] = percentile(warm, 0.95)
    out["warm_vs_cold_speedup"] = out["request_ms_p50"] / out["warm_request_ms_p50"]
    with DispatchCounter() as counted:
        done = work.run(model, cache)
    out["request_passes"] = done.forward_passes
    out["host_syncs_per_pass"] = counted.syncs / done.forward_passes
    out["aten_ops_per_pass"] = ops_per_pass(model, work, cache)
    if is_cuda:
        try:
            out.update(profile_passes(graphed.logits, device, 20, "graphed"))
            out.update(profile_passes(eager.logits, device, 5, "eager"))
        except Exception as error:  # noqa: BLE001 - the profiler is a tool, not the subject
            out["error_profile"] = f"{type(error).__name__}: {one_line(error, 400)}"
    return out


def release(device: torch.device) -> None:
    """Free what the last measurement left (its model is gone once its function returned)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_passes(fn: Callable[[], object], device: torch.device, count: int,
                   label: str) -> dict[str, float]:
    """GPU-busy ms and kernel launches per call of fn, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            fn()
        _sync(device)
    busy_us = 0.0
    launches = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            busy_us += event.time_range.elapsed_us()
        elif event.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch",
                            "cuLaunchKernel", "cuLaunchKernelEx"):
            launches += 1
    return {f"gpu_busy_ms_per_pass_{label}": busy_us / 1e3 / count,
            f"launches_per_pass_{label}": launches / count}


@torch.inference_mode()
def bench_autoregressive(args: ModelArgs, device: torch.device, dtype: torch.dtype,
                         reps: int) -> dict:
    """The same-shape AR peer: transformers' generate, 32 new tokens after the 2k prompt,
    static KV cache, greedy, eager (no torch.compile)."""
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError:
        from engine.setup.extras import install_hint

        raise RuntimeError(f"it needs transformers: {install_hint('bench')}") from None

    config = Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, max_position_embeddings=CONTEXT + 2 * HOLE + 64,
        rope_theta=args.rope_theta, tie_word_embeddings=args.tie_embeddings)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    prompt = torch.randint(0, args.vocab_size - 3, (1, CONTEXT), device=device)
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=AR_NEW_TOKENS,
                   min_new_tokens=AR_NEW_TOKENS, do_sample=False, pad_token_id=0,
                   cache_implementation="static")

    def generate():  # no fallback without the flag: a compiled 7B generate takes minutes
        return model.generate(prompt, disable_compile=True, **options)

    samples = time_ms(generate, device, reps)
    new = generate().shape[1] - CONTEXT
    return {"ar_ms_p50": statistics.median(samples), "ar_new_tokens": new,
            "ar_ms_per_token": statistics.median(samples) / max(new, 1)}


def floors(args: ModelArgs, device: torch.device, out: dict) -> None:
    """Add each mode's ratio to its floor where the device's peaks are known."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        return
    bandwidth, flops = peak
    n = CONTEXT + HOLE + 2
    attention = args.dim * (2 * args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    body = args.n_layers * (attention + 3 * args.dim * args.ffn_dim)
    encode_flops = 2 * n * body + 4 * n * n * args.n_heads * args.head_dim * args.n_layers + \
        2 * HOLE * args.vocab_size * args.dim
    out["encode_floor_ms"] = encode_flops / flops * 1e3
    for mode in out["modes"]:
        mode["pass_floor_ms"] = mode["pass_bytes"] / bandwidth * 1e3
        mode["pass_vs_floor"] = mode["pass_ms"] / mode["pass_floor_ms"]
        mode["encode_vs_floor"] = mode["encode_ms"] / out["encode_floor_ms"]


def run_shape_bench(shape: str, device: str, quants: list[str], reps: int,
                    with_ar: bool = True, progress: Callable[[dict], None] | None = None) -> dict:
    """Every mode, then the AR peer; `progress` gets the result so far after each of them."""
    dev = torch.device(device)
    args = SHAPES[shape]()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict = {"shape": shape, "device": str(dev), "dtype": str(dtype).removeprefix("torch."),
                 "context_tokens": CONTEXT, "hole": HOLE, "modes": [], "errors": []}
    if dev.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(dev)
        from engine.model.attention import xformers_probe

        out["xformers"] = xformers_probe()[1]
    reference = None
    for mode in quants:
        try:
            figures = bench_mode(args, dev, dtype, mode, reps, reference)
        except Exception as error:  # noqa: BLE001 - report every failure, keep measuring
            out["errors"].append(f"{mode}: {type(error).__name__}: {one_line(error, 400)}")
            continue
        finally:
            release(dev)
        if "first_pass_logits" in figures:
            reference = figures.pop("first_pass_logits")
        out["errors"].extend(f"{mode}: {v}" for k, v in figures.items() if k.startswith("error"))
        out["modes"].append(figures)
        if progress is not None:
            progress(out)
    if with_ar:
        try:
            out["autoregressive"] = bench_autoregressive(args, dev, dtype, max(3, reps // 2))
        except Exception as error:  # noqa: BLE001
            out["errors"].append(f"autoregressive peer: {type(error).__name__}: "
                                 f"{one_line(error, 400)}")
        finally:
            release(dev)
    by_mode = {m["quant"]: m for m in out["modes"]}
    base = by_mode.get("none")
    if base and "autoregressive" in out:
        out["diffusion_vs_ar_latency_ratio"] = base["request_ms_p50"] / \
            out["autoregressive"]["ar_ms_p50"]
    if base:
        out["aten_ops_per_pass"] = base["aten_ops_per_pass"]
        for mode in out["modes"]:
            mode["pass_vs_bf16"] = mode["pass_ms"] / base["pass_ms"]
    floors(args, dev, out)
    return out


def print_table(result: dict) -> None:
    print(f"shape {result['shape']} on {result.get('device_name', result['device'])} "
          f"({result['dtype']}), {result['context_tokens']}-token context, "
          f"{result['hole']}-slot hole, batch 1")
    columns = ("encode_ms", "pass_ms", "pass_ms_eager", "pass_ms_uncached", "request_ms_p50",
               "warm_request_ms_p50", "warm_vs_cold_speedup",
               "aten_ops_per_pass", "aten_ops_per_model_pass",
               "request_ms_p95", "gpu_busy_ms_per_pass_graphed", "launches_per_pass_graphed",
               "launches_per_pass_eager", "host_syncs_per_pass", "pass_floor_ms",
               "pass_vs_floor", "pass_vs_bf16", "logit_cosine_vs_bf16", "weight_bytes")
    modes = result["modes"]
    print(f"{'figure':<30}" + "".join(f"{m['quant']:>12}" for m in modes))
    for column in columns:
        if not any(column in m for m in modes):
            continue
        cells = []
        for m in modes:
            value = m.get(column)
            cells.append(f"{value:>12.3f}" if isinstance(value, float) else f"{str(value):>12}")
        print(f"{column:<30}" + "".join(cells))
    for m in modes:
        if m.get("kernels"):
            print(f"kernels {m['quant']}: {m['kernels']}")
    if "autoregressive" in result:
        ar = result["autoregressive"]
        print(f"autoregressive peer (transformers generate, static cache): {ar['ar_ms_p50']:.1f} "
              f"ms for {ar['ar_new_tokens']} tokens; diffusion/AR latency ratio "
              f"{result.get('diffusion_vs_ar_latency_ratio', float('nan')):.3f}")
    for error in result["errors"]:
        print(f"ERROR {error}")


def main_shape_bench(shape: str, device: str, quants: str, quick: bool, with_ar: bool) -> int:
    """CLI entry: a JSON line (marked partial) after each mode, the table, then one JSON line
    of everything; exit 1 when any figure failed."""
    import json

    from engine.api import EngineError

    modes = [m.strip() for m in quants.split(",") if m.strip()]
    unknown = [m for m in modes if m not in QUANT_MODES]
    if unknown or not modes:
        raise EngineError(f"unknown quant mode(s) {unknown} (choose from {', '.join(QUANT_MODES)})")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda asked for, but torch sees no CUDA device")
    if dev.type == "cpu" and "fp8" in modes:
        modes.remove("fp8")  # e4m3 matmuls only pay on Ada/Hopper GPUs
    def partial(so_far: dict) -> None:  # a run killed at its time cap keeps the modes it measured
        print(json.dumps({**so_far, "partial": True}, default=str), flush=True)

    result = run_shape_bench(shape, device, modes, reps=5 if quick else 10, with_ar=with_ar,
                             progress=partial)
    print_table(result)
    print(json.dumps(result, default=str))
    return 1 if result["errors"] else 0


def small_random_args(vocab: int = 8192) -> ModelArgs:
    """A small Dream-shaped model: big enough that matmuls, not Python, dominate a step on CPU."""
    return ModelArgs(
        family="dream", variant="dream", vocab_size=vocab, dim=256, n_layers=4, n_heads=8,
        n_kv_heads=2, head_dim=32, ffn_dim=768, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
        tie_embeddings=False, logit_shift=True, max_context=4096, infill_bos=True, infill_eos=True,
        mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
        bos_token_id=vocab - 3, expand_token_id=None, torch_dtype="float32",
    )
