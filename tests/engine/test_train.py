"""engine/train/trainer.py with its tokenized corpus and row sampler: rows in the infill layout,
loss goes down, resume is exact, checkpoints load, compile failures fall back to eager."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.api import CompletionRequest
from engine.denoise.buckets import SPAN_GUESSES
from engine.engine import Engine
from engine.model.tokenizer import Tokenizer, train_bpe
from engine.model.transformer import Transformer
from engine.model.weights import load_model
from engine.train import row_sampler
from engine.train import trainer as train
from engine.train.corpus import CorpusManifest
from engine.train.objective import masked_diffusion_loss
from engine.train.prefetch import Prefetcher
from engine.train.row_sampler import TokenRowSampler, TokenTables
from engine.train.token_corpus import TokenCorpus, build_token_corpus

SOURCES = [
    "import os\n\n\ndef list_python_files(root):\n    found = []\n"
    "    for name in sorted(os.listdir(root)):\n        if name.endswith('.py'):\n"
    "            found.append(os.path.join(root, name))\n    return found\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n"
    "    def increment(self, step=1):\n        self.count += step\n        return self.count\n",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\n\nprint([fibonacci(i) for i in range(10)])  # é 😀\n",
]
KEYS = ["lib/files.py", "lib/counter.py", "lib/fib.py"]
TINY = ["--preset", "tiny", "--minutes", "0", "--threads", "1", "--corpus-bytes", "150000",
        "--workers", "1"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe(SOURCES * 4, 300, variant="dream").save(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tokenizer_dir) -> TokenCorpus:
    return build_token_corpus(KEYS, SOURCES, tokenizer_dir / "tokenizer.json",
                              list_sha256="test", workers=1)


def make_sampler(corpus, tokenizer, **kwargs) -> TokenRowSampler:
    return TokenRowSampler(corpus, TokenTables.from_tokenizer(tokenizer), bos_id=tokenizer.bos_id,
                           eos_id=tokenizer.eos_id, **kwargs)


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory) -> Path:
    """A tiny run stopped (and saved) at step 3 of a 6-step budget."""
    out = tmp_path_factory.mktemp("runs") / "paused"
    train.train([*TINY, "--steps", "6", "--pause-at", "3", "--out", str(out)])
    return out


# ----------------------------------------------------------------------------- tokenized corpus


def test_tokenized_corpus_holds_each_file_and_its_line_starts(corpus, tokenizer):
    assert corpus.keys == KEYS and corpus.tokens.dtype == np.uint16
    for f, text in enumerate(SOURCES):
        ids = corpus.file_tokens(f).tolist()
        assert ids == tokenizer.encode(text)
        starts = corpus.line_starts[corpus.file_lines[f] : corpus.file_lines[f + 1]]
        local = (starts - corpus.file_starts[f]).tolist()
        assert local[0] == 0
        # Every listed token starts a line; every line that starts on a token boundary is listed.
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        boundaries = {s for s, _ in enc.offsets}
        line_chars = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
        expected = sorted({next(i for i, (s, _) in enumerate(enc.offsets) if s == c)
                           for c in line_chars if c in boundaries})
        assert local == expected
        for i in local:
            assert i == 0 or tokenizer.decode(ids[:i]).endswith("\n")


def test_tokenized_corpus_is_the_same_from_a_process_pool_and_reloads(corpus, tokenizer_dir,
                                                                      tmp_path):
    pooled = build_token_corpus(KEYS, SOURCES, tokenizer_dir / "tokenizer.json",
                                list_sha256="test", workers=2)
    for name in ("tokens", "file_starts", "line_starts", "file_lines"):
        np.testing.assert_array_equal(getattr(pooled, name), getattr(corpus, name))
    corpus.save(tmp_path / "tokens")
    again = TokenCorpus.load(tmp_path / "tokens")  # np.load(allow_pickle=False) throughout
    assert again.keys == KEYS and again.meta == corpus.meta
    np.testing.assert_array_equal(again.tokens, corpus.tokens)
    assert TokenCorpus.stored(tmp_path / "tokens")["n_tokens"] == corpus.n_tokens
    assert TokenCorpus.stored(tmp_path / "missing") is None


# ----------------------------------------------------------------------------- rows


def _source_of(tokenizer, ids: list[int]) -> bool:
    # A row may begin or end inside a multi-byte character: those bytes decode to U+FFFD.
    text = tokenizer.decode(ids).strip("\ufffd")
    return any(text in s for s in SOURCES)


def test_fim_rows_follow_the_engine_infill_layout(corpus, tokenizer):
    sampler = make_sampler(corpus, tokenizer, seq_len=96)
    _, fim = sampler.batch(np.random.default_rng(0), n_plain=0, n_fim=32)
    assert fim.ids.shape == (32, 96)
    for row, protect in zip(fim.ids.tolist(), fim.protect, strict=True):
        assert row[0] == tokenizer.bos_id
        hole = np.flatnonzero(~protect).tolist()
        assert len(hole) in SPAN_GUESSES
        assert hole == list(range(hole[0], hole[0] + len(hole)))  # one contiguous hole
        filled = [row[i] for i in hole]
        n_middle = next((k for k, t in enumerate(filled) if t == tokenizer.eos_id), len(filled))
        assert n_middle > 0 and all(t == tokenizer.eos_id for t in filled[n_middle:])
        # prefix + middle + suffix is a contiguous piece of one source file, then EOS only.
        suffix_end = hole[-1] + 1
        while suffix_end < len(row) and row[suffix_end] != tokenizer.eos_id:
            suffix_end += 1
        text_ids = row[1 : hole[0] + n_middle] + row[hole[-1] + 1 : suffix_end]
        assert _source_of(tokenizer, text_ids)
        assert all(t == tokenizer.eos_id for t in row[suffix_end:])


def test_holes_are_lines_rest_of_lines_and_spans_with_the_bucket_policy(corpus, tokenizer):
    sampler = make_sampler(corpus, tokenizer, seq_len=96, hole_policy="small-first")
    _, fim = sampler.batch(np.random.default_rng(1), n_plain=0, n_fim=1500)
    kinds, tight, blank = {"line": 0, "mid": 0}, [], 0
    for row, protect in zip(fim.ids.tolist(), fim.protect, strict=True):
        hole = np.flatnonzero(~protect)
        middle = [t for t in (row[i] for i in hole) if t != tokenizer.eos_id]
        before = tokenizer.decode(row[1 : hole[0]])
        starts_line = hole[0] == 1 or before.endswith("\n")
        text = tokenizer.decode(middle)
        blank += not text.strip()  # only an arbitrary span may be blank; never a chosen line
        kinds["line" if starts_line and text.endswith("\n") else "mid"] += 1
        fitting = [b for b in SPAN_GUESSES if b >= len(middle)]
        tight.append(len(hole) == fitting[0])
    assert kinds["line"] > 500 and kinds["mid"] > 100 and blank < 0.05 * len(fim.ids)
    # small-first: the tightest bucket ~55% of the time when several fit, more when one does.
    assert 0.5 < np.mean(tight) < 0.8


def test_plain_rows_are_full_windows_from_a_line_start(corpus, tokenizer):
    sampler = make_sampler(corpus, tokenizer, seq_len=24)
    plain, _ = sampler.batch(np.random.default_rng(1), n_plain=16, n_fim=0)
    assert plain.ids.shape == (16, 24)
    for row, protect in zip(plain.ids.tolist(), plain.protect.tolist(), strict=True):
        assert row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id
        body = row[1:-1]
        n = sum(not p for p in protect)
        assert protect == [True] + [False] * n + [True] * (23 - n)
        assert n == 22 or all(t == tokenizer.eos_id for t in body[n:])  # only at a file's end
        assert _source_of(tokenizer, body[:n])
        window = tokenizer.decode(body[:n])
        assert any(s.startswith(window) or f"\n{window}" in s for s in SOURCES)


def test_short_infill_rows_excluded_files_and_the_plain_fallback(corpus, tokenizer, monkeypatch):
    keep = np.array([False, True, False])
    sampler = make_sampler(corpus, tokenizer, seq_len=96, fim_seq_len=72, keep=keep)
    plain, fim = sampler.batch(np.random.default_rng(2), n_plain=8, n_fim=8)
    assert plain.ids.shape == (8, 96) and fim.ids.shape == (8, 72)
    for row in plain.ids.tolist():
        assert tokenizer.decode(row).startswith(tokenizer.decode(corpus.file_tokens(1)[:3]))
    monkeypatch.setattr(TokenRowSampler, "_hole", lambda self, draws: None)
    _, fallback = sampler.batch(np.random.default_rng(3), n_plain=0, n_fim=3)
    assert fallback.ids.shape == (3, 72) and (fallback.ids[:, 0] == tokenizer.bos_id).all()
    assert row_sampler.ATTEMPTS >= 10


def test_prefetcher_yields_steps_in_order_and_reraises_failures():
    with Prefetcher(lambda step: step * 10, first_step=5, depth=2) as batches:
        assert [batches.get(s) for s in range(5, 9)] == [50, 60, 70, 80]

    def broken(step):
        raise ValueError(f"no rows at {step}")

    with Prefetcher(broken, first_step=0) as batches, pytest.raises(RuntimeError, match="no rows"):
        batches.get(0)


# ----------------------------------------------------------------------------- training


def test_training_steps_decrease_the_loss(corpus, tokenizer):
    torch.manual_seed(0)
    preset = train.PRESETS["tiny"]
    model = Transformer(train.model_args(preset, tokenizer))
    train.init_weights(model)
    sampler = make_sampler(corpus, tokenizer, seq_len=96)
    plain, fim = sampler.batch(np.random.default_rng(0), n_plain=4, n_fim=4)
    tensors = [torch.from_numpy(a) for a in (plain.ids, plain.protect, fim.ids, fim.protect)]

    def loss(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return (masked_diffusion_loss(model, tensors[0], None, generator=gen,
                                      mask_id=tokenizer.mask_id, logit_shift=True,
                                      protect=tensors[1])
                + masked_diffusion_loss(model, tensors[2], None, generator=gen,
                                        mask_id=tokenizer.mask_id, logit_shift=True,
                                        span_prob=0.0, protect=tensors[3]))

    with torch.no_grad():
        before = float(sum(loss(s) for s in range(8)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        opt.zero_grad()
        loss(100 + step).backward()
        opt.step()
    with torch.no_grad():
        after = float(sum(loss(s) for s in range(8)))
    assert after < 0.7 * before


def test_export_splits_weights_into_shards_under_the_limit(tokenizer, tmp_path, monkeypatch):
    preset = train.PRESETS["tiny"]
    model = Transformer(train.model_args(preset, tokenizer))
    train.init_weights(model)
    limit = 60_000 + 64 * 1024
    shards = train.shard_count(model, torch.bfloat16, limit)
    assert shards > 1
    from engine.model.weights import save_checkpoint

    save_checkpoint(model, tokenizer, tmp_path, dtype=torch.bfloat16, shards=shards)
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) == shards and all(f.stat().st_size <= limit for f in files)
    loaded = load_model(str(tmp_path))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name].float(),
                                   value.to(torch.bfloat16).float(), msg=name)
    # Shipped as the embedded model, a sharded folder is found like a single-file one.
    from engine.model import embedded_model

    monkeypatch.setattr(embedded_model, "EMBEDDED_DIR", tmp_path)
    assert embedded_model.default_model_path() == tmp_path
    (tmp_path / "model.safetensors.index.json").unlink()
    assert embedded_model.default_model_path() is None


@pytest.mark.slow
def test_run_writes_a_published_checkpoint_that_loads_and_completes(paused_run):
    ckpt = paused_run / "checkpoint"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "TRAINING.md",
                 "corpus.json.gz"):
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["torch_dtype"] == "bfloat16"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}

    loaded = load_model(str(ckpt))
    assert loaded.args.mask_token_id == loaded.tokenizer.mask_id
    assert loaded.args.max_context == train.PRESETS["tiny"].seq_len

    engine = Engine.load(str(ckpt))
    result = engine.complete(CompletionRequest(prefix="def f(x):\n    ", suffix="\n",
                                               max_tokens=8, seed=0))
    assert result.stats.forward_passes >= 1
    engine.close()

    manifest = CorpusManifest.load(ckpt / "corpus.json.gz")
    assert manifest.n_tokens and manifest.n_tokens > 0
    assert manifest.files and all(f.key.startswith("stdlib/") for f in manifest.files)
    tokens = TokenCorpus.load(paused_run / "state" / "tokens")
    assert tokens.n_tokens == manifest.n_tokens and tokens.keys == [f.key for f in manifest.files]
    report = (ckpt / "TRAINING.md").read_text()
    assert manifest.list_hash in report and "steps: 3" in report and "| stdlib |" in report


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(paused_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(paused_run, resumed)
    tokens_file = resumed / "state" / "tokens" / "tokens.npy"
    written = tokens_file.stat().st_mtime_ns
    train.train([*TINY, "--steps", "6", "--resume", "--out", str(resumed)])
    assert tokens_file.stat().st_mtime_ns == written  # the tokenized corpus is reused
    straight = tmp_path / "straight"
    train.train([*TINY, "--steps", "6", "--out", str(straight)])

    state = json.loads((resumed / "state" / "train_state.json").read_text())
    assert state["step"] == 6
    timing = ("seconds", "curve", "phases", "first_step_s", "first_step_tokens", "data_wait_s")
    other = json.loads((straight / "state" / "train_state.json").read_text())
    assert state == {**other, **{k: state[k] for k in timing}}
    a = load_file(str(resumed / "state" / "model.safetensors"))
    b = load_file(str(straight / "state" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_refuses_to_overwrite_a_run_or_resume_nothing(paused_run, tmp_path):
    with pytest.raises(SystemExit, match="--resume"):
        train.train([*TINY, "--steps", "6", "--out", str(paused_run)])
    with pytest.raises(SystemExit, match="no run to continue"):
        train.train([*TINY, "--steps", "6", "--resume", "--out", str(tmp_path / "empty")])


@pytest.mark.slow
def test_a_failing_torch_compile_falls_back_to_eager_loudly(paused_run, tmp_path, monkeypatch,
                                                            capsys):
    def broken_compile(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor exploded")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    run = tmp_path / "run"
    shutil.copytree(paused_run, run)
    train.train([*TINY, "--steps", "5", "--resume", "--compile", "on", "--out", str(run)])
    state = json.loads((run / "state" / "train_state.json").read_text())
    assert state["step"] == 5 and state["compile"].startswith("failed: inductor exploded")
    assert "WARNING: torch.compile failed" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_data_measures_the_row_sampler(tmp_path, capsys):
    train.main(["--bench-data", "--preset", "tiny", "--corpus-bytes", "100000",
                "--bench-batches", "3", "--workers", "1", "--out", str(tmp_path / "none")])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "row-sampler" and record["corpus_tokens"] > 0
    assert record["step"]["tokens_per_s"] > 0 and record["step"]["rows"] > 0
