"""TRAINING.md: the record that ships next to a checkpoint written by engine/train/trainer.py."""

from __future__ import annotations

from collections import Counter

from engine.train.corpus import CorpusManifest


def corpus_groups(manifest: CorpusManifest, top: int = 25) -> list[tuple[str, int, int]]:
    """(group, files, bytes) by root and top-level package (`stdlib`, `site-packages/torch`),
    largest first; the rest folded into one row. The full list is corpus.json.gz."""
    files: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for f in manifest.files:
        root, _, rel = f.key.partition("/")
        group = root if root == "stdlib" or "/" not in rel else f"{root}/{rel.split('/', 1)[0]}"
        files[group] += 1
        size[group] += f.n_bytes
    ordered = [(g, files[g], size[g]) for g, _ in size.most_common()]
    if len(ordered) > top:
        rest = ordered[top - 1 :]
        ordered = ordered[: top - 1] + [(f"{len(rest)} other groups", sum(r[1] for r in rest),
                                         sum(r[2] for r in rest))]
    return ordered


def training_report(args, n_params: int, state, dtype_name: str) -> str:
    """Markdown record of a run: model, corpus, objective, throughput, loss curve."""
    c = state.corpus
    curve = "\n".join(_curve_row(row) for row in _thin(state.curve, 25))
    tests = "skipped" if state.skip_tests else "sampled"
    notes = "".join("\n- " + n for n in state.notes)
    groups = "\n".join(f"| {g} | {n} | {b / 1e6:.1f} |" for g, n, b in c.get("groups", []))
    tok = ("the embedded model's byte-level BPE (engine/model/embedded/tokenizer.json)"
           if state.tokenizer == "embedded" else "byte-level BPE trained on the corpus")
    gpu = state.device.startswith("cuda")
    how = (f"bf16 autocast on {state.device_name or state.device}, fused AdamW, torch.compile "
           f"{state.compile}" if gpu else "fp32 on CPU, AdamW")
    phases = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s"
                       for k, v in state.phases.items())
    steady = state.steady_tokens_per_s()
    data_wait = (f"{state.data_wait_s:.1f} s ({state.data_wait_s / max(state.seconds, 1e-9):.1%} "
                 "of the training time)")
    where = f"on {state.device_name or state.device}" if gpu else "on a CPU"
    return f"""# maskfill embedded model: how it was trained

Written by `python -m engine.train` (preset `{state.preset}`, seed {state.seed}).

## Model
Dream layout (`model_type` Dream, Qwen2 weight names, shifted logits, bidirectional attention),
trained from scratch by this project. {n_params / 1e6:.2f}M parameters: hidden {args.dim},
{args.n_layers} layers, {args.n_heads} query / {args.n_kv_heads} key-value heads,
SwiGLU {args.ffn_dim}, vocabulary {args.vocab_size} ({tok}), tied embeddings,
trained window {args.max_context} tokens. Weights stored as {dtype_name}.

## Corpus
Python sources from the standard library, then the packages installed next to the training
interpreter, chosen by `engine/train/corpus.py` (sorted file list, seeded shuffle per root, byte
budget;
files sharing a word 10-gram with any HumanEval problem dropped; nothing from the FIM benchmark
folder or from maskfill's own sources), tokenized once into flat arrays
(`engine/train/token_corpus.py`).
- files: {c.get('n_files')}, bytes: {c.get('n_bytes')}, tokens: {c.get('n_tokens')}
- file-list sha256: `{c.get('list_sha256')}` (every file with its sha256: `corpus.json.gz`)
- dropped for HumanEval overlap: {c.get('n_excluded_overlap')}

| files from | files | MB |
|---|---|---|
{groups}

## Training
Masked diffusion (t ~ U(1e-3, 1), loss weighted by 1/t): half of each batch's tokens plain text
({args.max_context}-token rows starting at a line, half of them with a contiguous masked span),
half infill rows `[BOS] prefix middle EOS*pad suffix [EOS]`
({state.fim_seq_len or args.max_context} tokens) with only the hole maskable (hole of 8/16/32/64
slots, drawn {state.hole_policy!r}; middles are whole lines, a few lines, the rest of a line or
arbitrary spans, cut at token boundaries, `engine/train/row_sampler.py`); rows from files shorter
than a row end in attended EOS that is never a target; the loss is averaged over rows. Test-suite
files {tests}. {how}, cosine schedule.{notes}
- steps: {state.step}, tokens seen: {state.tokens} ({state.tokens / 1e6:.2f}M), rows per step:
  {state.rows_per_step}
- wall time: {state.seconds / 60:.1f} min of training; {steady:,.0f} tokens/s after the first
  step (first step {state.first_step_s:.1f} s); waiting for data: {data_wait}
- phases: {phases or 'not recorded'}
- final loss (nats/token, 1/t-weighted): {state.curve[-1][3] if state.curve else float('nan'):.3f}

| step | tokens (M) | minutes | loss (all rows) | loss (infill rows) | tokens/s |
|---|---|---|---|---|---|
{curve}

## What it is not
{n_params / 1e6:.1f}M parameters trained for {state.seconds / 60:.0f} minutes {where}. It runs the
whole pipeline (Dream-layout loader, samplers, LSP server) on any machine, offline; measure what it
can do with `make eval` before relying on it. Point maskfill at Dream-Coder, DreamOn or Open-dCoder
for strong completions.
"""


def _curve_row(row: list) -> str:
    step, tokens, minutes, loss, fim = row[:5]
    rate = f"{row[5]:,.0f}" if len(row) > 5 else "-"
    return f"| {step} | {tokens / 1e6:.2f} | {minutes:.1f} | {loss:.3f} | {fim:.3f} | {rate} |"


def _thin(rows: list, n: int) -> list:
    if len(rows) <= n:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in idx]
