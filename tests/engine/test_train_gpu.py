"""engine/train/gpu.py (make train-gpu) end to end on the CPU: tiny preset, a few steps."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from engine.api import CompletionRequest
from engine.engine import Engine
from engine.model.weights import load_model
from engine.train import gpu as train_gpu

TINY = ["--preset", "tiny", "--device", "cpu", "--minutes", "0.5", "--steps", "3",
        "--corpus-bytes", "150000", "--workers", "1", "--threads", "1", "--log-every", "1"]


@pytest.mark.slow
def test_pipeline_writes_a_checkpoint_that_loads_and_completes(tmp_path, capsys):
    out = tmp_path / "out"
    assert train_gpu.main([*TINY, "--out", str(out), "--work", str(tmp_path / "work"),
                           "--eval-tasks", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["eval"]["tasks"] == 2
    assert {"corpus_select_s", "tokenize_s", "train_s", "export_s", "eval_s",
            "total_s"} <= summary["phases_s"].keys()

    files = sorted(f.name for f in out.iterdir())
    assert files == sorted(["TRAINING.md", train_gpu.ARCHIVE, "model.safetensors",
                            train_gpu.PROGRESS])
    assert len(files) <= train_gpu.MAX_FILES
    assert all((out / f).stat().st_size <= train_gpu.MAX_FILE_BYTES for f in files)
    report = (out / "TRAINING.md").read_text()
    assert "## This run (`make train-gpu`)" in report and "| eval |" in report

    # The shards plus the unpacked archive are a complete published checkpoint.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt)
    with tarfile.open(ckpt / train_gpu.ARCHIVE) as tar:
        tar.extractall(ckpt, filter="data")
    assert (ckpt / "train-gpu" / "train-gpu.log").read_text().count("[train") > 3
    loaded = load_model(str(ckpt))
    assert loaded.args.max_context == 96 and loaded.dtype == torch.float32
    engine = Engine.load(str(ckpt))
    result = engine.complete(CompletionRequest(prefix="def f(x):\n    ", suffix="\n",
                                               max_tokens=8, seed=0))
    assert result.stats.forward_passes >= 1
    engine.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure")
def test_asking_for_cuda_without_it_fails_loudly_with_a_log(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--device", "cuda", "--out", str(out), "--work", str(tmp_path / "work")]
    assert train_gpu.main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED in phase environment" in err and "CUDA is not available" in err
    assert "FAILED in phase environment" in (out / train_gpu.LOG).read_text()
    assert train_gpu.main([*TINY, "--out", str(out)]) == 2  # a used folder is refused


@pytest.mark.slow
def test_a_failure_during_training_still_returns_the_weights_and_the_log(tmp_path, monkeypatch):
    from engine.train import trainer as train

    real_step = train._Step.__call__

    def failing_step(self, batch, step):
        if step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self, batch, step)

    monkeypatch.setattr(train._Step, "__call__", failing_step)
    out = tmp_path / "out"
    assert train_gpu.main([*TINY, "--out", str(out), "--work", str(tmp_path / "work"),
                           "--eval-tasks", "2"]) == 1
    log = (out / train_gpu.LOG).read_text()
    assert "FAILED in phase training" in log and "out of memory (simulated)" in log
    assert "saving the weights of the last full step" in log
    assert {"model.safetensors", train_gpu.ARCHIVE, "TRAINING.md"} <= {
        f.name for f in out.iterdir()}
    assert "steps: 2," in (out / "TRAINING.md").read_text()


def test_a_killed_run_leaves_its_record_and_log(tmp_path):
    """Killed mid-training (a device call's hard end), train-gpu.json is valid and holds the
    plan, the finished environment phase and the phase under way; the log holds the lines
    written so far (a real subprocess, killed with SIGKILL)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "engine.train.gpu", *TINY, "--out", str(out),
                             "--work", str(tmp_path / "work"), "--steps", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})

    def phases() -> list[dict]:
        try:
            return json.loads((out / train_gpu.PROGRESS).read_text())["phases"]
        except (OSError, ValueError, KeyError):
            return []

    try:
        deadline = time.monotonic() + 120
        while not any(p["name"] == "training" for p in phases()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
    record = json.loads((out / train_gpu.PROGRESS).read_text())
    assert record["plan"]["worst_case_s"] <= 540 and record["finished"] is False
    assert [(p["name"], p["status"]) for p in record["phases"]] == [
        ("environment", "done"), ("training", "running")]
    assert record["environment"]["device"] == "cpu"
    assert "environment: {" in (out / train_gpu.LOG).read_text()
