"""Train maskfill's embedded model: a small Dream-layout masked-diffusion code model.

    python -m engine.train                      # preset "small" for 60 minutes into runs/embedded
    python -m engine.train --preset gpu --minutes 8 --out /tmp/run    # one CUDA GPU
    python -m engine.train --preset tiny --steps 50 --out /tmp/run
    python -m engine.train --out runs/embedded --resume --minutes 90   # continue a run
    python -m engine.train --bench-data --preset gpu                   # row sampler tokens/s
    (`make train-gpu`, engine/train/gpu.py: corpus, training, export and eval in one timed script)

Pipeline: deterministic corpus selection (engine/train/corpus.py, a process pool) -> tokenizer (a
byte-level BPE trained on the corpus, or the embedded model's for presets that keep it) -> the
corpus tokenized once, in parallel, into flat arrays under the run folder
(engine/train/token_corpus.py)
-> rows cut from those arrays by index arithmetic (engine/train/row_sampler.py) in a background
thread
(engine/train/prefetch.py) -> masked-diffusion loss (engine/train/objective.py) -> AdamW (fused,
with bf16
autocast and optionally torch.compile on CUDA). Half of each batch's tokens are plain text noised
at a random ratio t (half of those rows with a contiguous span); the other half are infill rows
laid out exactly as the engine's infill prompt, `[BOS] prefix middle EOS*pad suffix [EOS]`, with
only the hole maskable, so the model learns to fill a hole and to close it with EOS. Rows of step
s are drawn from an RNG seeded by (seed, s): a resumed run sees the same batches.

The run folder holds `state/` (fp32 weights, optimizer moments as safetensors, train_state.json,
tokenizer, the tokenized corpus as .npy; no pickle anywhere) and `checkpoint/` (the published
layout in bf16 via engine.model.weights.save_checkpoint, sharded to <= 15 MB files, plus TRAINING.md
and the corpus manifest): the latter is what ships as engine/model/embedded/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from engine.api import one_line
from engine.denoise.buckets import SPAN_GUESSES
from engine.model.config import ModelArgs
from engine.model.embedded_model import EMBEDDED_DIR
from engine.model.tokenizer import Tokenizer, train_bpe
from engine.model.transformer import Transformer
from engine.train.corpus import (
    CorpusManifest,
    default_roots,
    is_test_file,
    load_corpus_files,
    select_corpus,
)
from engine.train.objective import masked_diffusion_loss
from engine.train.prefetch import Prefetcher
from engine.train.report import corpus_groups, training_report
from engine.train.row_sampler import HOLE_POLICIES, TokenRowSampler, TokenTables
from engine.train.token_corpus import TokenCorpus, build_token_corpus, file_sha256

TOKENIZER_SAMPLE_BYTES = 12_000_000  # BPE merges stabilise long before the whole corpus
MAX_SHARD_BYTES = 15_000_000  # exported safetensors files stay under this (a device returns 16 MiB)
COMPILE_MIN_MINUTES = 3.0  # --compile auto: torch.compile only when the budget can repay it


@dataclass(frozen=True)
class Preset:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    seq_len: int
    batch_size: int  # rows of seq_len tokens per step (infill rows share them, see train())
    lr: float
    corpus_bytes: int
    tokenizer: str = "train"  # "train": BPE trained on the corpus; "embedded": engine/model/embedded's  # noqa: E501
    warmup_steps: int = 100


PRESETS: dict[str, Preset] = {
    # Tests: trains in seconds, learns nothing useful.
    "tiny": Preset(64, 2, 4, 2, 128, 384, 96, 4, 3e-3, 400_000),
    # The CPU model shipped first: ~5.8M parameters, 11.6 MB in bf16, 384-token window.
    "small": Preset(256, 6, 4, 2, 768, 4096, 384, 8, 1.5e-3, 48_000_000),
    # One CUDA GPU for minutes (make train-gpu): 12.3M parameters (24.6 MB in bf16), 1024-token
    # window, the embedded tokenizer, 128 x 1024 tokens a step. The shape is the largest whose
    # CPU latency at ~1000 tokens of context (random weights, 2 threads) stayed under 800 ms with
    # room to spare; wider or deeper ones did not (docs/LOG.md, 2026-11-28).
    "gpu": Preset(448, 5, 7, 1, 1216, 4096, 1024, 128, 2e-3, 400_000_000,
                  tokenizer="embedded", warmup_steps=150),
}


def model_args(preset: Preset, tokenizer: Tokenizer) -> ModelArgs:
    return ModelArgs(
        family="dream", variant="dream", vocab_size=preset.vocab_size, dim=preset.dim,
        n_layers=preset.n_layers, n_heads=preset.n_heads, n_kv_heads=preset.n_kv_heads,
        head_dim=preset.dim // preset.n_heads, ffn_dim=preset.ffn_dim, norm_eps=1e-6,
        rope_theta=10_000.0, qkv_bias=True, tie_embeddings=True, logit_shift=True,
        max_context=preset.seq_len, infill_bos=True, infill_eos=True,
        mask_token_id=tokenizer.mask_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, torch_dtype="bfloat16",
    )


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), residual projections scaled down by depth, zero biases.
    (nn.Embedding's default N(0, 1) makes a tied head's first logits huge.)"""
    residual_std = 0.02 / math.sqrt(2 * model.args.n_layers)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(param)
        elif param.dim() == 2:
            is_residual = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
            torch.nn.init.normal_(param, std=residual_std if is_residual else 0.02)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- run state


@dataclass
class TrainState:
    preset: str
    seed: int
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    minutes_budget: float = 60.0
    steps_budget: int | None = None
    tokens_budget: int | None = None
    corpus: dict = dataclasses.field(default_factory=dict)  # manifest summary
    # [step, tokens, minutes, loss, infill loss, tokens/s]
    curve: list = dataclasses.field(default_factory=list)
    hole_policy: str = "uniform"  # runs saved before the policy existed used uniform
    notes: list = dataclasses.field(default_factory=list)  # changes made when resuming
    skip_tests: bool = False  # runs saved before the option existed sampled test files too
    fim_seq_len: int | None = None  # None: infill rows as long as plain rows
    tokenizer: str = "train"
    device: str = "cpu"
    device_name: str = ""
    compile: str = "off"  # "off" | "on" | "failed: <reason>"
    phases: dict = dataclasses.field(default_factory=dict)  # phase -> seconds (this session)
    first_step_s: float = 0.0  # the first step of the session (includes torch.compile)
    first_step_tokens: int = 0
    data_wait_s: float = 0.0  # training thread blocked on the batch queue
    rows_per_step: str = ""

    def progress(self) -> float:
        parts = [self.seconds / 60.0 / self.minutes_budget] if self.minutes_budget else []
        if self.steps_budget:
            parts.append(self.step / self.steps_budget)
        if self.tokens_budget:
            parts.append(self.tokens / self.tokens_budget)
        return max(parts) if parts else 0.0

    def steady_tokens_per_s(self) -> float:
        """Throughput without the first step (compilation, warm-up)."""
        seconds = self.seconds - self.first_step_s
        return (self.tokens - self.first_step_tokens) / seconds if seconds > 0 else 0.0


def lr_at(state: TrainState, peak: float, warmup_steps: int = 100) -> float:
    """Linear warm-up, then cosine down to 10% of peak at the end of the budget."""
    if state.step < warmup_steps:
        return peak * (state.step + 1) / warmup_steps
    p = min(1.0, state.progress())
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


def save_state(run: Path, model: Transformer, opt: torch.optim.AdamW, state: TrainState) -> None:
    """fp32 weights + optimizer moments (safetensors) + JSON, each written atomically."""
    folder = run / "state"
    folder.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    moments: dict[str, Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                moments[f"{names[id(p)]}.exp_avg"] = st["exp_avg"].cpu()
                moments[f"{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"].cpu()
                moments[f"{names[id(p)]}.step"] = torch.as_tensor(st["step"]).float().reshape(
                    1).cpu()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(folder / "model.safetensors", lambda tmp: save_file(weights, tmp))
    _atomic(folder / "optimizer.safetensors", lambda tmp: save_file(moments, tmp))
    save_state_json(run, state)


def save_state_json(run: Path, state: TrainState) -> None:
    _atomic(run / "state" / "train_state.json", lambda tmp: Path(tmp).write_text(
        json.dumps(dataclasses.asdict(state), indent=1)))


def load_state(run: Path, model: Transformer, opt: torch.optim.AdamW) -> TrainState:
    folder = run / "state"
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    moments = load_file(str(folder / "optimizer.safetensors"))
    fused = any(group.get("fused") for group in opt.param_groups)
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" in moments:
            step = moments[f"{name}.step"].reshape(()).clone()
            opt.state[p] = {
                # Fused AdamW keeps its step counter on the parameter's device.
                "step": step.to(p.device) if fused else step,
                "exp_avg": moments[f"{name}.exp_avg"].to(p.device),
                "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(p.device),
            }
    raw = json.loads((folder / "train_state.json").read_text())
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in raw.items() if k in known})


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- export


def shard_count(model: Transformer, dtype: torch.dtype, max_bytes: int) -> int:
    """The fewest shards for which save_checkpoint's split (tensors in published order, cut into
    equal counts) keeps every file under `max_bytes`."""
    from engine.model.weights import split_projections, weight_name_map

    native = split_projections(model.state_dict(), model.args)  # as save_checkpoint writes it
    sizes = [native[nat].numel() * torch.empty((), dtype=dtype).element_size()
             for nat in weight_name_map(model.args).values()]
    slack = 64 * 1024  # safetensors header
    for shards in range(1, len(sizes) + 1):
        groups = [0] * shards
        for i, size in enumerate(sizes):
            groups[i * shards // len(sizes)] += size
        if max(groups) + slack <= max_bytes:
            return shards
    raise RuntimeError(f"a single tensor of this model exceeds {max_bytes} bytes")


def export_checkpoint(run: Path, model: Transformer, tokenizer: Tokenizer, state: TrainState,
                      dtype: torch.dtype, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """The published layout plus TRAINING.md and the corpus manifest: the shippable folder."""
    from engine.model.weights import save_checkpoint

    out = run / "checkpoint"
    tmp = run / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(model, tokenizer, tmp, dtype=dtype,
                    shards=shard_count(model, dtype, max_shard_bytes))
    too_big = [f.name for f in tmp.iterdir() if f.stat().st_size > max_shard_bytes]
    if too_big:
        raise RuntimeError(f"exported files over {max_shard_bytes} bytes: {too_big}")
    manifest = run / "state" / "corpus.json.gz"
    (tmp / "corpus.json.gz").write_bytes(manifest.read_bytes())
    dtype_name = str(dtype).removeprefix("torch.")
    (tmp / "TRAINING.md").write_text(
        training_report(model.args, parameter_count(model), state, dtype_name))
    if out.exists():
        old = run / "checkpoint.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- corpus


def prepare_run(run: Path, preset: Preset, ns: argparse.Namespace, log,
                phases: dict) -> tuple[Tokenizer, TokenCorpus, dict]:
    """Corpus, tokenizer and tokenized corpus for a fresh run, written under run/state."""
    folder = run / "state"
    folder.mkdir(parents=True, exist_ok=True)
    budget = ns.corpus_bytes or preset.corpus_bytes
    roots = default_roots()
    log(f"selecting corpus (seed {ns.seed}, up to {budget} bytes) from "
        + ", ".join(f"{name} {path}" for name, path in roots.items()))
    started = time.monotonic()
    manifest, texts = select_corpus(seed=ns.seed, max_bytes=budget, roots=roots,
                                    skip_tests=ns.skip_tests, workers=ns.workers)
    phases["corpus_select_s"] = round(time.monotonic() - started, 2)
    log(f"corpus: {len(texts)} files, {manifest.n_bytes} bytes, "
        f"{len(manifest.excluded_overlap)} dropped for HumanEval overlap "
        f"({phases['corpus_select_s']:.1f} s)")
    if not texts:
        raise SystemExit("the corpus is empty: no usable Python files were found")
    started = time.monotonic()
    if preset.tokenizer == "embedded":
        tokenizer = Tokenizer.from_dir(EMBEDDED_DIR)
        if tokenizer.vocab_size != preset.vocab_size:
            raise SystemExit(f"the embedded tokenizer has {tokenizer.vocab_size} tokens, the "
                             f"preset expects {preset.vocab_size}")
        log(f"tokenizer: the embedded model's ({tokenizer.vocab_size} tokens)")
    else:
        sample, size = [], 0
        for text in texts[:: max(1, manifest.n_bytes // TOKENIZER_SAMPLE_BYTES)]:
            sample.append(text)
            size += len(text)
        log(f"training BPE tokenizer (vocab {preset.vocab_size}) on {size} bytes")
        tokenizer = train_bpe(sample, preset.vocab_size, variant="dream")
        phases["tokenizer_train_s"] = round(time.monotonic() - started, 2)
    tokenizer.save(folder)
    started = time.monotonic()
    corpus = build_token_corpus([f.key for f in manifest.files], texts, folder / "tokenizer.json",
                                list_sha256=manifest.list_hash, workers=ns.workers)
    corpus.save(folder / "tokens")
    phases["tokenize_s"] = round(time.monotonic() - started, 2)
    manifest.n_tokens = corpus.n_tokens
    manifest.save(folder / "corpus.json.gz")
    log(f"corpus tokens: {corpus.n_tokens} in {corpus.meta['n_lines']} lines "
        f"({phases['tokenize_s']:.1f} s)")
    return tokenizer, corpus, corpus_summary(manifest)


def resumed_corpus(run: Path, manifest: CorpusManifest, ns: argparse.Namespace, log,
                   phases: dict) -> TokenCorpus:
    """The run's tokenized corpus; runs saved before it existed are tokenized now, once."""
    folder = run / "state"
    stored = TokenCorpus.stored(folder / "tokens")
    wanted = {"tokenizer_sha256": file_sha256(folder / "tokenizer.json"),
              "list_sha256": manifest.list_hash}
    if stored is not None and all(stored.get(k) == v for k, v in wanted.items()):
        return TokenCorpus.load(folder / "tokens")
    started = time.monotonic()
    files, missing = load_corpus_files(manifest)
    if missing:
        log(f"warning: {missing} corpus files are missing or changed on this machine")
    corpus = build_token_corpus([k for k, _ in files], [t for _, t in files],
                                folder / "tokenizer.json", list_sha256=manifest.list_hash,
                                workers=ns.workers)
    corpus.save(folder / "tokens")
    phases["tokenize_s"] = round(time.monotonic() - started, 2)
    log(f"tokenized the manifest's {len(files)} files once: {corpus.n_tokens} tokens")
    return corpus


def corpus_summary(manifest: CorpusManifest) -> dict:
    return {"n_files": len(manifest.files), "n_bytes": manifest.n_bytes,
            "n_tokens": manifest.n_tokens, "list_sha256": manifest.list_hash,
            "n_excluded_overlap": len(manifest.excluded_overlap), "seed": manifest.seed,
            "groups": corpus_groups(manifest)}


def make_sampler(corpus: TokenCorpus, tokenizer: Tokenizer, preset: Preset, fim_seq_len: int,
                 hole_policy: str, skip_tests: bool) -> TokenRowSampler:
    keep = np.array([not is_test_file(k) for k in corpus.keys]) if skip_tests else None
    return TokenRowSampler(corpus, TokenTables.from_tokenizer(tokenizer),
                           bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                           seq_len=preset.seq_len, fim_seq_len=fim_seq_len,
                           hole_policy=hole_policy, keep=keep)


def batch_rows(preset: Preset, fim_fraction: float, fim_seq_len: int) -> tuple[int, int]:
    """(plain rows, infill rows) per step. Only an infill row's hole is a target, so short
    infill rows buy more targets per FLOP: the batch keeps its token count, with shorter infill
    rows taking more of its rows."""
    n_plain = preset.batch_size - int(round(preset.batch_size * fim_fraction))
    n_fim = int(round((preset.batch_size - n_plain) * preset.seq_len / fim_seq_len))
    return n_plain, n_fim


# ----------------------------------------------------------------------------- main loop


def train(argv: list[str] | None = None) -> Path:
    ns = parse_args(argv)
    torch.set_num_threads(ns.threads)
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {ns.device}: CUDA is not available in this torch build/machine")
    preset = _preset(ns)
    run = Path(ns.out)
    log = _logger()
    phases: dict[str, float] = {}

    resuming = (run / "state" / "train_state.json").is_file()
    if resuming and not ns.resume:
        raise SystemExit(f"{run} already holds a run: pass --resume to continue it, "
                         "or choose another --out")
    if ns.resume and not resuming:
        raise SystemExit(f"--resume: no run to continue in {run}")

    if resuming:
        tokenizer = Tokenizer.from_dir(run / "state")
        manifest = CorpusManifest.load(run / "state" / "corpus.json.gz")
        corpus = resumed_corpus(run, manifest, ns, log, phases)
        summary = corpus_summary(manifest)
    else:
        tokenizer, corpus, summary = prepare_run(run, preset, ns, log, phases)

    torch.manual_seed(ns.seed)
    model = Transformer(model_args(preset, tokenizer))
    init_weights(model)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=preset.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    if resuming:
        state = load_state(run, model, opt)
    else:
        state = TrainState(preset=ns.preset, seed=ns.seed, corpus=summary,
                           tokenizer=preset.tokenizer)
    fim_seq_len = ns.fim_seq_len or default_fim_seq_len(preset)
    if resuming:
        for change in _changes(state, ns, fim_seq_len, preset):
            state.notes.append(f"from step {state.step}: {change}")
    state.hole_policy = ns.hole_policy
    state.skip_tests = ns.skip_tests
    state.fim_seq_len = fim_seq_len
    state.minutes_budget = ns.minutes
    if ns.stop_by is not None:  # a hard end (make train-gpu): the schedule shrinks to fit it
        left = (ns.stop_by - time.time()) / 60.0
        if left <= 0:
            raise SystemExit(f"--stop-by: no time left to train ({-left:.1f} min past)")
        fits = state.seconds / 60.0 + left
        if not ns.minutes or fits < ns.minutes:
            log(f"training budget {fits:.2f} min (of {ns.minutes:g}) to end by --stop-by")
            state.minutes_budget = fits
    state.steps_budget = ns.steps
    state.tokens_budget = ns.tokens
    state.device = str(device)
    state.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    state.phases = phases

    sampler = make_sampler(corpus, tokenizer, preset, fim_seq_len, ns.hole_policy,
                           ns.skip_tests)
    n_plain, n_fim = batch_rows(preset, ns.fim_fraction, fim_seq_len)
    state.rows_per_step = f"{n_plain} x {preset.seq_len} plain + {n_fim} x {fim_seq_len} infill"
    tokens_per_step = n_plain * preset.seq_len + n_fim * fim_seq_len
    start = f"resuming at step {state.step}" if resuming else "fresh"
    where = f"{device} ({state.device_name})" if state.device_name else str(device)
    log(f"model: {parameter_count(model) / 1e6:.2f}M parameters on {where}; {start}; "
        f"{state.rows_per_step} = {tokens_per_step} tokens a step")
    compiled = _maybe_compile(model, ns, device, state, log)
    export_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                    "float32": torch.float32}[ns.export_dtype]
    step_fn = _Step(model, opt, device, tokenizer.mask_id, n_plain, n_fim, ns.seed)

    def make_batch(step: int):
        plain, fim = sampler.batch(np.random.default_rng([ns.seed, step]), n_plain, n_fim)
        return tuple(_host_tensor(a, device) for a in (plain.ids, plain.protect, fim.ids,
                                                         fim.protect))

    from tqdm import tqdm

    bar = tqdm(total=ns.steps, initial=state.step, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    sums = torch.zeros(2, device=device)
    window_steps, window_start, window_tokens = 0, time.monotonic(), state.tokens
    last_save = time.monotonic()
    session_first = True
    started = time.monotonic()
    try:
        with Prefetcher(make_batch, state.step, depth=ns.prefetch) as batches:
            t_prev = time.monotonic()
            while state.progress() < 1.0 and state.step != ns.pause_at:
                batch = batches.get(state.step)
                for group in opt.param_groups:
                    group["lr"] = lr_at(state, preset.lr, preset.warmup_steps)
                try:
                    losses = step_fn(batch, state.step)
                except Exception as exc:  # torch.compile failures surface at the first call
                    if not compiled:
                        raise
                    state.compile = f"failed: {one_line(exc, 300)}"
                    log(f"WARNING: torch.compile failed at step {state.step} "
                        f"({one_line(exc, 500)}); continuing in eager mode")
                    _uncompile(model)
                    compiled = False
                    losses = step_fn(batch, state.step)
                sums += losses
                now = time.monotonic()
                if session_first:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        now = time.monotonic()
                    state.first_step_s = now - t_prev
                    state.first_step_tokens = state.tokens + tokens_per_step
                    session_first = False
                    log(f"first step: {state.first_step_s:.1f} s (torch.compile {state.compile})")
                    window_start, window_tokens = now, state.tokens + tokens_per_step
                state.seconds += now - t_prev
                t_prev = now
                state.step += 1
                state.tokens += tokens_per_step
                window_steps += 1
                bar.update(1)
                if state.step % ns.log_every == 0:
                    mean = (sums / window_steps).tolist()  # syncs with the GPU: log steps only
                    now = time.monotonic()
                    rate = (state.tokens - window_tokens) / max(now - window_start, 1e-9)
                    sums.zero_()
                    window_steps, window_start, window_tokens = 0, now, state.tokens
                    state.curve.append([state.step, state.tokens, round(state.seconds / 60, 2),
                                        round(mean[0], 4), round(mean[1], 4), round(rate)])
                    bar.set_postfix(loss=f"{mean[0]:.3f}", tok_s=f"{rate:.0f}", refresh=False)
                    log(f"step {state.step} tokens {state.tokens} loss {mean[0]:.3f} "
                        f"infill {mean[1]:.3f} tok/s {rate:.0f} progress {state.progress():.3f}")
                if ns.save_every and now - last_save >= ns.save_every * 60:
                    state.data_wait_s += batches.wait_s
                    batches.wait_s = 0.0
                    _save_all(run, model, opt, tokenizer, state, export_dtype, log)
                    last_save = time.monotonic()
                    t_prev = last_save  # saving time is not training time
            state.data_wait_s += batches.wait_s
    except Exception:
        # Keep what was trained (an out-of-memory step, a kernel error): save, then re-raise.
        log(f"training failed at step {state.step}; saving the weights of the last full step")
        with contextlib.suppress(Exception):
            _save_all(run, model, opt, tokenizer, state, export_dtype, log)
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    phases["train_s"] = round(time.monotonic() - started, 2)
    log(f"training: {state.step} steps, {state.tokens} tokens, "
        f"{state.steady_tokens_per_s():.0f} tokens/s after the first step, "
        f"waiting for data {state.data_wait_s:.1f} s")
    started = time.monotonic()
    out = _save_all(run, model, opt, tokenizer, state, export_dtype, log)
    phases["export_s"] = round(time.monotonic() - started, 2)
    save_state_json(run, state)  # with the export's time
    verb = "paused" if state.step == ns.pause_at and state.progress() < 1.0 else "done"
    log(f"{verb}: {state.step} steps, {state.tokens} tokens; checkpoint at {out}")
    return out


class _Step:
    """One optimizer step on a (plain, infill) batch; returns the two losses on the device."""

    def __init__(self, model, opt, device, mask_id, n_plain, n_fim, seed):
        self.model, self.opt, self.device = model, opt, device
        self.mask_id, self.n_plain, self.n_fim, self.seed = mask_id, n_plain, n_fim, seed
        self.params = [p for p in model.parameters()]
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())

    def __call__(self, batch, step: int) -> Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step)
        plain_ids, plain_protect, fim_ids, fim_protect = (
            t.to(self.device, non_blocking=True) for t in batch)
        self.opt.zero_grad(set_to_none=True)
        losses = []
        with self.autocast:
            for ids, protect, span_prob, rows in ((plain_ids, plain_protect, 0.5, self.n_plain),
                                                  (fim_ids, fim_protect, 0.0, self.n_fim)):
                if rows == 0:
                    losses.append(torch.zeros((), device=self.device))
                    continue
                # Every row is full length (row_sampler): no attention mask at all.
                losses.append(masked_diffusion_loss(
                    self.model, ids, None, mask_id=self.mask_id, logit_shift=True, generator=gen,
                    span_prob=span_prob, protect=protect))
        loss = (losses[0] * self.n_plain + losses[1] * self.n_fim) / (self.n_plain + self.n_fim)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return torch.stack([loss.detach(), losses[1].detach()]).float()


def _maybe_compile(model: Transformer, ns: argparse.Namespace, device: torch.device,
                   state: TrainState, log) -> bool:
    """torch.compile the transformer blocks when asked (auto: on CUDA with a budget of at least
    COMPILE_MIN_MINUTES). Regional compilation: every block shares one graph per row shape, so
    compiling costs seconds rather than minutes, and the state dict keeps its names. The cost
    shows as the first step's time, logged and recorded."""
    wanted = ns.compile == "on" or (
        ns.compile == "auto" and device.type == "cuda"
        and (not ns.minutes or ns.minutes >= COMPILE_MIN_MINUTES))
    if not wanted:
        state.compile = "off"
        log(f"torch.compile: off (--compile {ns.compile})")
        return False
    try:
        import torch._dynamo.config as dynamo_config

        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else \
            "cache_size_limit"
        setattr(dynamo_config, limit, max(64, getattr(dynamo_config, limit)))
        for layer in model.layers:
            layer.compile(dynamic=False)  # two static shapes: plain rows and infill rows
    except Exception as exc:
        _uncompile(model)
        state.compile = f"failed: {one_line(exc, 300)}"
        log(f"WARNING: torch.compile unavailable ({one_line(exc, 500)}); running eager")
        return False
    state.compile = "on"
    log(f"torch.compile: on (--compile {ns.compile}, each block); the first step includes "
        "compiling")
    return True


def _uncompile(model: Transformer) -> None:
    for layer in model.layers:  # Module.compile() keeps the compiled call here
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None


def _host_tensor(array: np.ndarray, device: torch.device) -> Tensor:
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if device.type == "cuda" else tensor


def _preset(ns: argparse.Namespace) -> Preset:
    preset = PRESETS[ns.preset]
    if ns.batch_rows:
        preset = dataclasses.replace(preset, batch_size=ns.batch_rows)
    return preset


def default_fim_seq_len(preset: Preset) -> int:
    """Half the window, but room for the longest hole with context on both sides."""
    return min(preset.seq_len, max(preset.seq_len // 2, 2 * SPAN_GUESSES[-1]))


def _changes(state: TrainState, ns: argparse.Namespace, fim_seq_len: int, preset: Preset
             ) -> list[str]:
    """What a resumed run does differently from the run it continues, for TRAINING.md."""
    changes = []
    if state.hole_policy != ns.hole_policy:
        changes.append(f"hole lengths drawn {ns.hole_policy!r} (before: {state.hole_policy!r})")
    if ns.skip_tests != state.skip_tests:
        changes.append("files of test suites " + ("no longer sampled" if ns.skip_tests
                                                  else "sampled again"))
    before = state.fim_seq_len or preset.seq_len
    if fim_seq_len != before:
        changes.append(f"infill rows {fim_seq_len} tokens long (before: {before}), "
                       "more of them per batch")
    return changes


def _save_all(run, model, opt, tokenizer, state, dtype, log) -> Path:
    save_state(run, model, opt, state)
    out = export_checkpoint(run, model, tokenizer, state, dtype)
    log(f"saved step {state.step} -> {out}")
    return out


def _logger():
    def log(msg: str) -> None:
        print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


# ----------------------------------------------------------------------------- --bench-data


def bench_data(ns: argparse.Namespace) -> dict:
    """Tokens/s of the row sampler alone (one thread), on the preset's row shapes."""
    preset = _preset(ns)
    fim_seq_len = ns.fim_seq_len or default_fim_seq_len(preset)
    n_plain, n_fim = batch_rows(preset, ns.fim_fraction, fim_seq_len)
    log = _logger()
    stored = Path(ns.out) / "state"
    if TokenCorpus.stored(stored / "tokens") is not None:
        corpus = TokenCorpus.load(stored / "tokens")
        tokenizer = Tokenizer.from_dir(stored)
        log(f"using the tokenized corpus of {ns.out}")
    else:
        tokenizer = Tokenizer.from_dir(EMBEDDED_DIR)
        manifest, texts = select_corpus(seed=ns.seed, max_bytes=ns.corpus_bytes or 20_000_000,
                                        skip_tests=ns.skip_tests, workers=ns.workers)
        corpus = build_token_corpus([f.key for f in manifest.files], texts,
                                    EMBEDDED_DIR / "tokenizer.json",
                                    list_sha256=manifest.list_hash, workers=ns.workers)
        log(f"tokenized {len(texts)} files: {corpus.n_tokens} tokens")
    sampler = make_sampler(corpus, tokenizer, preset, fim_seq_len, ns.hole_policy, ns.skip_tests)
    sampler.batch(np.random.default_rng(0), n_plain, n_fim)  # warm caches
    timings = {}
    for name, rows in (("plain", (n_plain, 0)), ("infill", (0, n_fim)),
                       ("step", (n_plain, n_fim))):
        started = time.perf_counter()
        for step in range(ns.bench_batches):
            sampler.batch(np.random.default_rng([ns.seed, step]), *rows)
        seconds = time.perf_counter() - started
        tokens = ns.bench_batches * (rows[0] * preset.seq_len + rows[1] * fim_seq_len)
        timings[name] = {"tokens_per_s": round(tokens / seconds),
                         "ms_per_batch": round(seconds / ns.bench_batches * 1e3, 3),
                         "rows": rows[0] + rows[1]}
    record = {"bench": "row-sampler", "preset": ns.preset, "corpus_tokens": corpus.n_tokens,
              "rows_per_step": f"{n_plain} x {preset.seq_len} + {n_fim} x {fim_seq_len}",
              "batches": ns.bench_batches, **timings}
    for name, t in timings.items():
        print(f"  {name:<7} {t['rows']:>4} rows  {t['ms_per_batch']:>9.3f} ms/batch  "
              f"{t['tokens_per_s'] / 1e6:>7.2f} M tokens/s")
    print(json.dumps(record), flush=True)
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="Train the embedded Dream-layout diffusion model. With no arguments: preset "
                    "'small' for 60 minutes into runs/embedded; the shippable folder is "
                    "runs/embedded/checkpoint (copy it to engine/model/embedded/).")
    p.add_argument("--out", default="runs/embedded", help="run folder (default runs/embedded)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget (0: none)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--stop-by", type=float, default=None, metavar="UNIX_TIME",
                   help="end training by this time; the budget (and LR schedule) shrinks to fit")
    p.add_argument("--tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--pause-at", type=int, default=None,
                   help="save and stop at this step, budget unchanged (continue with --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-bytes", type=int, default=None, help="override the preset's")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="window-length rows per step, override the preset's (infill rows "
                        "share them)")
    p.add_argument("--hole-policy", choices=sorted(HOLE_POLICIES), default="small-first",
                   help="how infill rows pick their hole length among the buckets that fit")
    p.add_argument("--fim-fraction", type=float, default=0.5,
                   help="share of the batch's tokens in infill rows")
    p.add_argument("--fim-seq-len", type=int, default=None,
                   help="infill row length (default: half the window, at least 128)")
    p.add_argument("--keep-tests", dest="skip_tests", action="store_false",
                   help="also sample the corpus's test-suite files (skipped by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that read and tokenize the corpus (default: one per CPU)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model (auto: on CUDA when --minutes is at least "
                        f"{COMPILE_MIN_MINUTES:g}); a failure falls back to eager, loudly")
    p.add_argument("--prefetch", type=int, default=6, help="batches built ahead of the step")
    p.add_argument("--save-every", type=float, default=5.0,
                   help="minutes between checkpoints (0: only at the end)")
    p.add_argument("--log-every", type=int, default=10, help="steps per loss-curve point")
    p.add_argument("--export-dtype", choices=["bfloat16", "float16", "float32"],
                   default="bfloat16")
    p.add_argument("--bench-data", action="store_true",
                   help="measure the row sampler alone (tokens/s on one thread) and exit; uses "
                        "--out's tokenized corpus if it has one, else --corpus-bytes (20 MB)")
    p.add_argument("--bench-batches", type=int, default=50, help="batches timed by --bench-data")
    ns = p.parse_args(argv)
    seq_len = PRESETS[ns.preset].seq_len
    if ns.fim_seq_len is not None and not SPAN_GUESSES[-1] + 2 < ns.fim_seq_len <= seq_len:
        p.error(f"--fim-seq-len must be above {SPAN_GUESSES[-1] + 2} (the longest hole and its "
                f"specials) and at most the preset's window, {seq_len}")
    if not ns.bench_data and not ns.minutes and not ns.steps and not ns.tokens:
        p.error("give at least one budget: --minutes, --steps or --tokens")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.bench_data:
        bench_data(ns)
    else:
        train(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
