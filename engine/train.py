"""Train maskfill's embedded model: a small Dream-layout masked-diffusion code model.

    python -m engine.train                      # preset "small" for 60 minutes into runs/embedded
    python -m engine.train --preset tiny --steps 50 --out /tmp/run
    python -m engine.train --out runs/embedded --resume --minutes 90   # continue a run

Pipeline: deterministic corpus selection (engine/corpus.py) -> byte-level BPE trained on it ->
rows sampled from the corpus text -> masked-diffusion loss (engine/objective.py) -> AdamW.
Half of each batch is plain text noised at a random ratio t (half of those with a contiguous span,
engine/objective.py); the other half is laid out exactly as the engine's infill prompt,
`[BOS] prefix middle EOS*pad suffix [EOS]`, with only the hole (middle + EOS padding, 8/16/32/64
slots like the engine's span buckets) maskable, so the model learns to fill a hole and to close it
with EOS. Rows are drawn from an RNG seeded by (seed, step): a resumed run sees the same batches.

The run folder holds `state/` (fp32 weights, optimizer moments as safetensors, train_state.json,
tokenizer; no pickle anywhere) and `checkpoint/` (the published layout in bf16 via
engine.weights.save_checkpoint, plus TRAINING.md and the corpus manifest): the latter is what ships
as engine/embedded/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from engine.config import ModelArgs
from engine.corpus import CorpusManifest, is_test_file, load_corpus_texts, select_corpus
from engine.model import Transformer
from engine.objective import masked_diffusion_loss
from engine.tokenizer import Tokenizer, train_bpe

HOLE_BUCKETS = (8, 16, 32, 64)  # the engine's span buckets (engine/engine.py)
# How a FIM row's hole length is drawn among the buckets that fit its middle. "uniform" pads
# holes with ~75% EOS on average, and a small model then learns "EOS" as the safe answer for every
# masked slot and floods holes with it; "small-first" favours the tightest bucket.
HOLE_POLICIES = {"uniform": (1.0, 1.0, 1.0, 1.0), "small-first": (0.55, 0.25, 0.12, 0.08)}
TOKENIZER_SAMPLE_BYTES = 12_000_000
_NEWLINE = re.compile("\n")  # BPE merges stabilise long before the whole corpus


@dataclass(frozen=True)
class Preset:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    seq_len: int
    batch_size: int
    lr: float
    corpus_bytes: int


PRESETS: dict[str, Preset] = {
    # Tests: trains in seconds, learns nothing useful.
    "tiny": Preset(64, 2, 4, 2, 128, 384, 96, 4, 3e-3, 400_000),
    # The shipped CPU model: ~5.8M parameters, 11.6 MB in bf16.
    "small": Preset(256, 6, 4, 2, 768, 4096, 384, 8, 1.5e-3, 48_000_000),
    # For a GPU: ~40M parameters.
    "base": Preset(512, 10, 8, 2, 1536, 8192, 1024, 32, 1e-3, 200_000_000),
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


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    ids: Tensor  # (B, L)
    key_valid: Tensor  # (B, L) False on right padding
    protect: Tensor  # (B, L) never masked


class RowSampler:
    """Builds training rows from corpus text, in the engine's Dream infill layout."""

    def __init__(self, texts: list[str], tokenizer: Tokenizer, seq_len: int,
                 hole_policy: str = "small-first", fim_seq_len: int | None = None):
        self.texts = [t for t in texts if t.strip()]
        sizes = np.array([len(t) for t in self.texts], dtype=np.float64)
        self.weights = sizes / sizes.sum()  # files drawn by size: every byte equally likely
        self.tok = tokenizer
        self.seq_len = seq_len
        self.fim_seq_len = fim_seq_len or seq_len
        self.chars = seq_len * 6  # generous: code runs ~3-4 chars per token
        self._line_starts: dict[int, list[int]] = {}
        self.hole_weights = HOLE_POLICIES[hole_policy]

    def batch(self, rng: np.random.Generator, n_plain: int, n_fim: int) -> tuple[Batch, Batch]:
        plain = [self._plain_row(rng, self.seq_len) for _ in range(n_plain)]
        fim = [self._fim_row(rng) for _ in range(n_fim)]
        return self._collate(plain, self.seq_len), self._collate(fim, self.fim_seq_len)

    def _pick(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.texts), p=self.weights))

    def _starts(self, index: int) -> list[int]:
        if index not in self._line_starts:
            text = self.texts[index]
            self._line_starts[index] = [0] + [m.end() for m in _NEWLINE.finditer(text)
                                              if m.end() < len(text)]
        return self._line_starts[index]

    def _plain_row(self, rng: np.random.Generator, length: int) -> tuple[list[int], list[bool]]:
        text = self.texts[self._pick(rng)]
        start = int(rng.integers(0, len(text)))
        start = text.rfind("\n", 0, start) + 1  # windows start at a line, like a prefix does
        body = self.tok.encode(text[start : start + self.chars])[: length - 2]
        ids = [self.tok.bos_id, *body, self.tok.eos_id]
        return ids, [True] + [False] * len(body) + [True]

    def _fim_row(self, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
        for _ in range(20):
            index = self._pick(rng)
            text = self.texts[index]
            span = _middle_span(text, self._starts(index), rng)
            if span is None:
                continue
            lo, hi = span
            middle = self.tok.encode(text[lo:hi])
            if 0 < len(middle) <= HOLE_BUCKETS[-1]:
                break
        else:  # pathological corpus (tests): fall back to a plain row
            return self._plain_row(rng, self.fim_seq_len)
        fitting = [i for i, b in enumerate(HOLE_BUCKETS) if b >= len(middle)]
        weights = np.array([self.hole_weights[i] for i in fitting])
        hole = HOLE_BUCKETS[fitting[int(rng.choice(len(fitting), p=weights / weights.sum()))]]
        budget = self.fim_seq_len - 2 - hole
        prefix = self.tok.encode(text[max(0, lo - self.chars) : lo])
        suffix = self.tok.encode(text[hi : hi + self.chars])
        # The engine's 3:1 prefix:suffix split; whatever one side leaves goes to the other.
        n_suffix = min(len(suffix), max(budget // 4, budget - len(prefix)))
        n_prefix = min(len(prefix), budget - n_suffix)
        prefix = prefix[len(prefix) - n_prefix :]
        suffix = suffix[:n_suffix]
        filled = middle + [self.tok.eos_id] * (hole - len(middle))
        ids = [self.tok.bos_id, *prefix, *filled, *suffix, self.tok.eos_id]
        protect = [True] * (1 + n_prefix) + [False] * hole + [True] * (n_suffix + 1)
        return ids, protect

    def _collate(self, rows: list[tuple[list[int], list[bool]]], length: int) -> Batch:
        n = len(rows)
        ids = torch.full((n, length), self.tok.eos_id, dtype=torch.long)
        valid = torch.zeros((n, length), dtype=torch.bool)
        protect = torch.ones((n, length), dtype=torch.bool)
        for i, (row, prot) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            valid[i, : len(row)] = True
            protect[i, : len(row)] = torch.tensor(prot)
        return Batch(ids, valid, protect)


def _middle_span(text: str, starts: list[int], rng: np.random.Generator) -> tuple[int, int] | None:
    """Char range of a hole: whole lines (most), the rest of a line, or an arbitrary span."""
    line = int(rng.integers(0, len(starts)))
    lo = starts[line]
    end_of_line = text.find("\n", lo)
    end_of_line = len(text) if end_of_line < 0 else end_of_line
    if not text[lo:end_of_line].strip():
        return None  # holes on blank lines teach nothing
    kind = rng.random()
    if kind < 0.5:  # one whole line, newline included (HumanEval single-line shape)
        return lo, min(len(text), end_of_line + 1)
    if kind < 0.75:  # a few whole lines
        last = min(len(starts) - 1, line + int(rng.integers(1, 6)))
        hi = starts[last + 1] if last + 1 < len(starts) else len(text)
        return lo, hi
    if kind < 0.9:  # the rest of a line from a cursor inside it (mid-line completion)
        cursor = int(rng.integers(lo, end_of_line))
        return (cursor, end_of_line) if cursor < end_of_line else None
    start = int(rng.integers(0, len(text)))
    return start, min(len(text), start + int(rng.integers(1, 120)))


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
    curve: list = dataclasses.field(default_factory=list)  # [step, tokens, minutes, loss, fim]
    hole_policy: str = "uniform"  # runs saved before the policy existed used uniform
    notes: list = dataclasses.field(default_factory=list)  # changes made when resuming
    skip_tests: bool = False  # runs saved before the option existed sampled test files too
    fim_seq_len: int | None = None  # None: infill rows as long as plain rows

    def progress(self) -> float:
        parts = [self.seconds / 60.0 / self.minutes_budget] if self.minutes_budget else []
        if self.steps_budget:
            parts.append(self.step / self.steps_budget)
        if self.tokens_budget:
            parts.append(self.tokens / self.tokens_budget)
        return max(parts) if parts else 0.0


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
                moments[f"{names[id(p)]}.exp_avg"] = st["exp_avg"]
                moments[f"{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"]
                moments[f"{names[id(p)]}.step"] = torch.as_tensor(st["step"]).float().reshape(1)
    _atomic(folder / "model.safetensors",
            lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp))
    _atomic(folder / "optimizer.safetensors", lambda tmp: save_file(moments, tmp))
    _atomic(folder / "train_state.json", lambda tmp: Path(tmp).write_text(
        json.dumps(dataclasses.asdict(state), indent=1)))


def load_state(run: Path, model: Transformer, opt: torch.optim.AdamW) -> TrainState:
    folder = run / "state"
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    moments = load_file(str(folder / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" in moments:
            opt.state[p] = {
                "step": moments[f"{name}.step"].reshape(()).clone(),
                "exp_avg": moments[f"{name}.exp_avg"],
                "exp_avg_sq": moments[f"{name}.exp_avg_sq"],
            }
    return TrainState(**json.loads((folder / "train_state.json").read_text()))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- export


def export_checkpoint(run: Path, model: Transformer, tokenizer: Tokenizer, state: TrainState,
                      dtype: torch.dtype) -> Path:
    """The published layout plus TRAINING.md and the corpus manifest: the shippable folder."""
    from engine.weights import save_checkpoint

    out = run / "checkpoint"
    tmp = run / "checkpoint.tmp"
    if tmp.exists():
        for f in tmp.iterdir():
            f.unlink()
    save_checkpoint(model, tokenizer, tmp, dtype=dtype)
    manifest = run / "state" / "corpus.json.gz"
    (tmp / "corpus.json.gz").write_bytes(manifest.read_bytes())
    (tmp / "TRAINING.md").write_text(training_report(model, state, dtype))
    if out.exists():
        old = run / "checkpoint.old"
        os.replace(out, old)
        os.replace(tmp, out)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, out)
    return out


def training_report(model: Transformer, state: TrainState, dtype: torch.dtype) -> str:
    a = model.args
    n_params = sum(p.numel() for p in model.parameters())
    c = state.corpus
    rows = _thin(state.curve, 25)
    curve = "\n".join(f"| {s} | {t / 1e6:.2f} | {m:.1f} | {lo:.3f} | {f:.3f} |"
                      for s, t, m, lo, f in rows)
    tests = "skipped" if state.skip_tests else "sampled"
    notes = "".join("\n- " + n for n in state.notes)
    return f"""# maskfill embedded model: how it was trained

Written by `python -m engine.train` (preset `{state.preset}`, seed {state.seed}).

## Model
Dream layout (`model_type` Dream, Qwen2 weight names, shifted logits, bidirectional attention),
trained from scratch by this project. {n_params / 1e6:.2f}M parameters: hidden {a.dim},
{a.n_layers} layers, {a.n_heads} query / {a.n_kv_heads} key-value heads, SwiGLU {a.ffn_dim},
vocabulary {a.vocab_size} (byte-level BPE trained on the corpus), tied embeddings, trained window
{a.max_context} tokens. Weights stored as {str(dtype).replace('torch.', '')}.

## Corpus
Python sources from the standard library, then the packages installed next to maskfill, chosen by
`engine/corpus.py` (sorted file list, seeded shuffle per root, byte budget; files sharing a word
10-gram with any HumanEval problem dropped; nothing from the FIM benchmark folder).
- files: {c.get('n_files')}, bytes: {c.get('n_bytes')}, tokens: {c.get('n_tokens')}
- file-list sha256: `{c.get('list_sha256')}` (the list itself: `corpus.json.gz`)
- dropped for HumanEval overlap: {c.get('n_excluded_overlap')}

## Training
Masked diffusion (t ~ U(1e-3, 1), loss weighted by 1/t): half of each batch's tokens plain text
({a.max_context}-token rows, half of them with a contiguous masked span), half infill rows
`[BOS] prefix middle EOS*pad suffix [EOS]` ({state.fim_seq_len or a.max_context} tokens) with only
the hole maskable (hole of 8/16/32/64 slots, drawn {state.hole_policy!r}); the loss is averaged
over rows, so shorter infill rows (more of them) weigh more. Test-suite files {tests}. AdamW,
cosine schedule, fp32 on CPU.{notes}
- steps: {state.step}, tokens seen: {state.tokens} ({state.tokens / 1e6:.2f}M),
  wall time: {state.seconds / 60:.1f} min
- final loss (nats/token, 1/t-weighted): {state.curve[-1][3] if state.curve else float('nan'):.3f}

| step | tokens (M) | minutes | loss (all rows) | loss (infill rows) |
|---|---|---|---|---|
{curve}

## What it is not
{n_params / 1e6:.1f}M parameters trained for {state.seconds / 60:.0f} minutes on a CPU. It exercises
the whole pipeline (Dream-layout loader, samplers, LSP server) on any machine, offline; it is
not a useful code model, and it does not solve programming problems. Point maskfill at
Dream-Coder, DreamOn or Open-dCoder for real use.
"""


def _thin(rows: list, n: int) -> list:
    if len(rows) <= n:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in idx]


# ----------------------------------------------------------------------------- main loop


def prepare_run(run: Path, preset: Preset, seed: int, corpus_bytes: int | None, skip_tests: bool,
                log) -> tuple[Tokenizer, list[str], dict]:
    """Corpus + tokenizer for a fresh run, written under run/state."""
    folder = run / "state"
    folder.mkdir(parents=True, exist_ok=True)
    log(f"selecting corpus (seed {seed}, {corpus_bytes or preset.corpus_bytes} bytes)")
    manifest, texts = select_corpus(seed=seed, max_bytes=corpus_bytes or preset.corpus_bytes,
                                    skip_tests=skip_tests)
    log(f"corpus: {len(texts)} files, {manifest.n_bytes} bytes, "
        f"{len(manifest.excluded_overlap)} dropped for HumanEval overlap")
    sample, size = [], 0
    for text in texts[:: max(1, manifest.n_bytes // TOKENIZER_SAMPLE_BYTES)]:
        sample.append(text)
        size += len(text)
    log(f"training BPE tokenizer (vocab {preset.vocab_size}) on {size} bytes")
    tokenizer = train_bpe(sample, preset.vocab_size, variant="dream")
    tokenizer.save(folder)
    counts = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
    manifest.n_tokens = sum(len(e.ids) for e in counts)
    manifest.save(folder / "corpus.json.gz")
    log(f"corpus tokens: {manifest.n_tokens}")
    return tokenizer, texts, _corpus_summary(manifest)


def _corpus_summary(manifest: CorpusManifest) -> dict:
    return {"n_files": len(manifest.files), "n_bytes": manifest.n_bytes,
            "n_tokens": manifest.n_tokens, "list_sha256": manifest.list_hash,
            "n_excluded_overlap": len(manifest.excluded_overlap), "seed": manifest.seed}


def train(argv: list[str] | None = None) -> Path:
    ns = parse_args(argv)
    torch.set_num_threads(ns.threads)
    device = torch.device(ns.device)
    preset = PRESETS[ns.preset]
    run = Path(ns.out)
    log = _logger()

    resuming = (run / "state" / "train_state.json").is_file()
    if resuming and not ns.resume:
        raise SystemExit(f"{run} already holds a run: pass --resume to continue it, "
                         "or choose another --out")
    if ns.resume and not resuming:
        raise SystemExit(f"--resume: no run to continue in {run}")

    if resuming:
        tokenizer = Tokenizer.from_dir(run / "state")
        manifest = CorpusManifest.load(run / "state" / "corpus.json.gz")
        # The manifest of a run started before test files were skipped may list them.
        keep = (lambda key: not is_test_file(key)) if ns.skip_tests else None
        texts, missing = load_corpus_texts(manifest, keep=keep)
        if missing:
            log(f"warning: {missing} corpus files are missing or changed on this machine")
        summary = _corpus_summary(manifest)
    else:
        tokenizer, texts, summary = prepare_run(run, preset, ns.seed, ns.corpus_bytes,
                                                 ns.skip_tests, log)

    torch.manual_seed(ns.seed)
    model = Transformer(model_args(preset, tokenizer))
    init_weights(model)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=preset.lr, betas=(0.9, 0.95), eps=1e-8)
    if resuming:
        state = load_state(run, model, opt)
        model.to(device)
    else:
        state = TrainState(preset=ns.preset, seed=ns.seed, corpus=summary)
    fim_seq_len = ns.fim_seq_len or default_fim_seq_len(preset)
    if resuming:
        for change in _changes(state, ns, fim_seq_len, preset):
            state.notes.append(f"from step {state.step}: {change}")
        log(f"sampling {len(texts)} of the manifest's {len(manifest.files)} files")
    state.hole_policy = ns.hole_policy
    state.skip_tests = ns.skip_tests
    state.fim_seq_len = fim_seq_len
    state.minutes_budget = ns.minutes
    state.steps_budget = ns.steps
    state.tokens_budget = ns.tokens

    n_params = sum(p.numel() for p in model.parameters())
    start = f"resuming at step {state.step}" if resuming else "fresh"
    log(f"model: {n_params / 1e6:.2f}M parameters; {start}")
    sampler = RowSampler(texts, tokenizer, preset.seq_len, ns.hole_policy, fim_seq_len)
    # Only an infill row's hole is a target, so short infill rows buy more targets per FLOP:
    # the batch keeps its token count, with shorter infill rows taking more of its rows.
    n_plain = preset.batch_size - int(round(preset.batch_size * ns.fim_fraction))
    n_fim = int(round((preset.batch_size - n_plain) * preset.seq_len / fim_seq_len))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    export_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                    "float32": torch.float32}[ns.export_dtype]

    from tqdm import tqdm

    bar = tqdm(total=ns.steps, initial=state.step, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    window: list[tuple[float, float]] = []
    last_save = time.monotonic()
    t_prev = time.monotonic()
    while state.progress() < 1.0 and state.step != ns.pause_at:
        rng = np.random.default_rng([ns.seed, state.step])
        gen = torch.Generator(device=device).manual_seed(ns.seed * 1_000_003 + state.step)
        plain, fim = sampler.batch(rng, n_plain, n_fim)
        for group in opt.param_groups:
            group["lr"] = lr_at(state, preset.lr)
        losses = []
        with autocast:
            for part, span_prob, rows in ((plain, 0.5, n_plain), (fim, 0.0, n_fim)):
                if rows == 0:
                    losses.append(torch.zeros((), device=device))
                    continue
                losses.append(masked_diffusion_loss(
                    model, part.ids.to(device), part.key_valid.to(device),
                    mask_id=tokenizer.mask_id, logit_shift=True, generator=gen,
                    span_prob=span_prob, protect=part.protect.to(device)))
        loss = (losses[0] * n_plain + losses[1] * n_fim) / (n_plain + n_fim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        now = time.monotonic()
        state.seconds += now - t_prev
        t_prev = now
        state.step += 1
        state.tokens += int(plain.key_valid.sum() + fim.key_valid.sum())
        window.append((loss.item(), losses[1].item()))
        tok_s = state.tokens / max(state.seconds, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1][0]:.3f}", tok_s=f"{tok_s:.0f}",
                        lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
        if state.step % ns.log_every == 0:
            mean = np.mean(window, axis=0)
            window.clear()
            state.curve.append([state.step, state.tokens, round(state.seconds / 60, 2),
                                round(float(mean[0]), 4), round(float(mean[1]), 4)])
            log(f"step {state.step} tokens {state.tokens} loss {mean[0]:.3f} "
                f"infill {mean[1]:.3f} tok/s {tok_s:.0f} progress {state.progress():.3f}")
        if now - last_save >= ns.save_every * 60:
            _save_all(run, model, opt, tokenizer, state, export_dtype, log)
            last_save = time.monotonic()
            t_prev = last_save  # saving time is not training time
    bar.close()
    out = _save_all(run, model, opt, tokenizer, state, export_dtype, log)
    verb = "paused" if state.step == ns.pause_at and state.progress() < 1.0 else "done"
    log(f"{verb}: {state.step} steps, {state.tokens} tokens; checkpoint at {out}")
    return out


def default_fim_seq_len(preset: Preset) -> int:
    """Half the window, but room for the longest hole with context on both sides."""
    return min(preset.seq_len, max(preset.seq_len // 2, 2 * HOLE_BUCKETS[-1]))


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
    out = export_checkpoint(run, model.to("cpu"), tokenizer, state, dtype)
    model.to(next(iter(opt.param_groups[0]["params"])).device)
    log(f"saved step {state.step} -> {out}")
    return out


def _logger():
    def log(msg: str) -> None:
        print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="Train the embedded Dream-layout diffusion model. With no arguments: preset "
                    "'small' for 60 minutes into runs/embedded; the shippable folder is "
                    "runs/embedded/checkpoint (copy it to engine/embedded/).")
    p.add_argument("--out", default="runs/embedded", help="run folder (default runs/embedded)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget (0: none)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--pause-at", type=int, default=None,
                   help="save and stop at this step, budget unchanged (continue with --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-bytes", type=int, default=None, help="override the preset's")
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
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps per loss-curve point")
    p.add_argument("--export-dtype", choices=["bfloat16", "float16", "float32"],
                   default="bfloat16")
    ns = p.parse_args(argv)
    seq_len = PRESETS[ns.preset].seq_len
    if ns.fim_seq_len is not None and not HOLE_BUCKETS[-1] + 2 < ns.fim_seq_len <= seq_len:
        p.error(f"--fim-seq-len must be above {HOLE_BUCKETS[-1] + 2} (the longest hole and its "
                f"specials) and at most the preset's window, {seq_len}")
    if not ns.minutes and not ns.steps and not ns.tokens:
        p.error("give at least one budget: --minutes, --steps or --tokens")
    return ns


def main(argv: list[str] | None = None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
