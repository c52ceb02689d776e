"""engine/train.py: rows in the infill layout, loss goes down, resume is exact, checkpoints load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine import train
from engine.api import CompletionRequest
from engine.corpus import CorpusManifest
from engine.engine import Engine
from engine.model import Transformer
from engine.objective import masked_diffusion_loss
from engine.tokenizer import train_bpe
from engine.weights import load_model

SOURCES = [
    "import os\n\n\ndef list_python_files(root):\n    found = []\n"
    "    for name in sorted(os.listdir(root)):\n        if name.endswith('.py'):\n"
    "            found.append(os.path.join(root, name))\n    return found\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n"
    "    def increment(self, step=1):\n        self.count += step\n        return self.count\n",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\n\nprint([fibonacci(i) for i in range(10)])\n",
]
TINY = ["--preset", "tiny", "--minutes", "0", "--threads", "1", "--corpus-bytes", "150000"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(SOURCES * 4, 300, variant="dream")


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory) -> Path:
    """A tiny run stopped (and saved) at step 3 of a 6-step budget."""
    out = tmp_path_factory.mktemp("runs") / "paused"
    train.train([*TINY, "--steps", "6", "--pause-at", "3", "--out", str(out)])
    return out


def test_fim_rows_follow_the_engine_infill_layout(tokenizer):
    sampler = train.RowSampler(SOURCES, tokenizer, seq_len=96)
    _, fim = sampler.batch(np.random.default_rng(0), n_plain=0, n_fim=16)
    for ids, valid, protect in zip(fim.ids, fim.key_valid, fim.protect, strict=True):
        row = ids[valid].tolist()
        assert row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id
        hole = (~protect[valid]).nonzero().flatten().tolist()
        assert len(hole) in train.HOLE_BUCKETS
        assert hole == list(range(hole[0], hole[0] + len(hole)))  # one contiguous hole
        # The hole holds the middle, then only EOS padding.
        filled = [row[i] for i in hole]
        n_middle = next((k for k, t in enumerate(filled) if t == tokenizer.eos_id), len(filled))
        assert n_middle > 0
        assert all(t == tokenizer.eos_id for t in filled[n_middle:])
        # prefix + middle + suffix is a contiguous piece of one source file.
        text = tokenizer.decode(row[1:-1])
        assert any(text in source for source in SOURCES)


def test_infill_rows_can_be_shorter_than_plain_rows(tokenizer):
    sampler = train.RowSampler(SOURCES, tokenizer, seq_len=96, fim_seq_len=72)
    plain, fim = sampler.batch(np.random.default_rng(2), n_plain=2, n_fim=6)
    assert plain.ids.shape == (2, 96) and fim.ids.shape == (6, 72)
    for protect, valid in zip(fim.protect, fim.key_valid, strict=True):
        assert int((~protect[valid]).sum()) in train.HOLE_BUCKETS


def test_an_infill_row_that_finds_no_hole_falls_back_to_a_plain_row_of_its_length(
        tokenizer, monkeypatch):
    monkeypatch.setattr(train, "_middle_span", lambda *args: None)
    sampler = train.RowSampler(SOURCES, tokenizer, seq_len=96, fim_seq_len=72)
    _, fim = sampler.batch(np.random.default_rng(3), n_plain=0, n_fim=3)
    assert fim.ids.shape == (3, 72)
    assert all(int(v.sum()) <= 72 for v in fim.key_valid)


def test_test_suites_stay_out_of_the_corpus(tmp_path):
    from engine.corpus import is_test_file, select_corpus

    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "core.py").write_text("def f():\n    return 1\n")
    (tmp_path / "pkg" / "tests" / "test_core.py").write_text("assert f() == 1\n")
    (tmp_path / "pkg" / "util_test.py").write_text("assert True\n")
    kwargs = dict(roots={"lib": tmp_path}, workers=1)
    kept, _ = select_corpus(**kwargs)
    assert [f.key for f in kept.files] == ["lib/pkg/core.py"]
    everything, _ = select_corpus(**kwargs, skip_tests=False)
    assert len(everything.files) == 3
    assert is_test_file("stdlib/test/test_os.py") and not is_test_file("stdlib/unittest/case.py")


def test_plain_rows_protect_only_bos_and_eos(tokenizer):
    sampler = train.RowSampler(SOURCES, tokenizer, seq_len=64)
    plain, _ = sampler.batch(np.random.default_rng(1), n_plain=4, n_fim=0)
    for ids, valid, protect in zip(plain.ids, plain.key_valid, plain.protect, strict=True):
        n = int(valid.sum())
        assert ids[0] == tokenizer.bos_id and ids[n - 1] == tokenizer.eos_id
        assert protect[:n].tolist() == [True] + [False] * (n - 2) + [True]


def test_training_steps_decrease_the_loss(tokenizer):
    torch.manual_seed(0)
    preset = train.PRESETS["tiny"]
    model = Transformer(train.model_args(preset, tokenizer))
    train.init_weights(model)
    sampler = train.RowSampler(SOURCES, tokenizer, seq_len=96)
    plain, fim = sampler.batch(np.random.default_rng(0), n_plain=4, n_fim=4)

    def loss(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return (masked_diffusion_loss(model, plain.ids, plain.key_valid, generator=gen,
                                      mask_id=tokenizer.mask_id, logit_shift=True,
                                      protect=plain.protect)
                + masked_diffusion_loss(model, fim.ids, fim.key_valid, generator=gen,
                                        mask_id=tokenizer.mask_id, logit_shift=True,
                                        span_prob=0.0, protect=fim.protect))

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
    report = (ckpt / "TRAINING.md").read_text()
    assert manifest.list_hash in report and "steps: 3" in report


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(paused_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(paused_run, resumed)
    train.train([*TINY, "--steps", "6", "--resume", "--out", str(resumed)])
    straight = tmp_path / "straight"
    train.train([*TINY, "--steps", "6", "--out", str(straight)])

    state = json.loads((resumed / "state" / "train_state.json").read_text())
    assert state["step"] == 6
    assert state == {**json.loads((straight / "state" / "train_state.json").read_text()),
                     "seconds": state["seconds"], "curve": state["curve"]}
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
