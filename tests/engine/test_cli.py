"""`python -m engine complete`: checkpoints it has never seen, and one clean line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.__main__ import split_at
from engine.api import EngineError
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.memorized import SNIPPETS, split_middle

SOURCE = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", "complete", *args],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )


def assert_one_clean_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def source_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "add.py"
    path.write_text(SOURCE)
    return path


@pytest.mark.parametrize("variant", ["dream", "llada", "open-dcoder"])
def test_completes_with_unseen_checkpoints_in_each_layout(tmp_path, source_file, variant):
    model = make_tiny_checkpoint(tmp_path / variant, variant, seed=7, shards=2)
    proc = run_cli("--model", str(model), "--file", str(source_file), "--line", "2",
                   "--col", "4", "--max-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    stats = result["stats"]
    assert stats["forward_passes"] >= 1
    assert sum(stats["tokens_committed_per_step"]) >= 1
    assert {"encode", "total"} <= set(stats["timings_ms"])
    assert result["candidates"], "a completion always has at least one candidate"


def test_memorized_middle_is_reproduced_through_the_cli(tmp_path, memorized_model):
    from engine.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(memorized_model)
    snippet = SNIPPETS[2]
    n = len(tokenizer.encode(snippet))
    prefix, middle, suffix = split_middle(tokenizer, snippet, n // 3, 2 * n // 3)
    path = tmp_path / "greet.py"
    path.write_text(prefix + suffix)
    line = prefix.count("\n") + 1
    col = len(prefix.rsplit("\n", 1)[-1])
    span = len(tokenizer.encode(middle))
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "complete", "--model", str(memorized_model),
         "--file", str(path), "--line", str(line), "--col", str(col), "--stop", "free",
         "--max-tokens", str(span), "--json"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == middle


def test_truncated_shard_is_refused_with_one_line(tmp_path, source_file):
    model = make_tiny_checkpoint(tmp_path / "m", "dream", shards=2)
    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = run_cli("--model", str(model), "--file", str(source_file), "--line", "1", "--col", "0")
    assert_one_clean_line(proc, shard.name)


def test_missing_model_folder_is_refused(tmp_path, source_file):
    proc = run_cli("--model", str(tmp_path / "nowhere"), "--file", str(source_file),
                   "--line", "1", "--col", "0")
    assert_one_clean_line(proc)


def test_bad_position_and_binary_file_are_refused(tmp_path, source_file):
    model = make_tiny_checkpoint(tmp_path / "m", "dream")
    proc = run_cli("--model", str(model), "--file", str(source_file), "--line", "99", "--col", "0")
    assert_one_clean_line(proc, "line 99")
    binary = tmp_path / "blob.py"
    binary.write_bytes(b"\x00\x01\x02code")
    proc = run_cli("--model", str(model), "--file", str(binary), "--line", "1", "--col", "0")
    assert_one_clean_line(proc, "binary")


def test_split_at_uses_editor_positions():
    text = "héllo\r\nwörld\n"
    assert split_at(text, 1, 2) == ("hé", "llo\r\nwörld\n")
    assert split_at(text, 2, 0) == ("héllo\r\n", "wörld\n")
    assert split_at(text, 3, 0) == (text, "")
    with pytest.raises(EngineError, match="column 9"):
        split_at(text, 2, 9)
    with pytest.raises(EngineError, match="line 0"):
        split_at(text, 0, 0)


def test_a_directory_or_form_feed_file_is_handled(tmp_path, source_file):
    model = make_tiny_checkpoint(tmp_path / "m", "dream")
    proc = run_cli("--model", str(model), "--file", str(tmp_path), "--line", "1", "--col", "0")
    assert_one_clean_line(proc, "cannot read")
    # A form feed is not a line break for an editor: line 2 starts after the "\n".
    assert split_at("a\x0cb\nc\n", 2, 0) == ("a\x0cb\n", "c\n")
    assert split_at("a\rb", 2, 1) == ("a\rb", "")


@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_bench_refuses_an_unusable_device_with_one_line(device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "engine", "bench", "--device", device],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert_one_clean_line(proc, "device")


@pytest.mark.parametrize(
    ("line", "col", "stop"),
    [
        (2, 11, "line"),  # "    return| a + b": text after the cursor -> the rest of the line
        (3, 0, "block"),  # the empty line -> a block
        (2, 16, "line"),  # the end of a written line -> the next line
    ],
)
def test_stop_auto_is_the_default_and_decides_as_the_server_does(
    source_file, memorized_model, line, col, stop
):
    proc = run_cli("--model", str(memorized_model), "--file", str(source_file),
                   "--line", str(line), "--col", str(col), "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"stop mode: {stop} (auto)"


def test_help_names_the_stop_default_and_the_column_base():
    proc = subprocess.run([sys.executable, "-m", "engine", "complete", "--help"],
                          capture_output=True, text=True, timeout=60)
    text = " ".join(proc.stdout.split())
    assert "{auto,line,block,free}" in text and "default: auto" in text
    assert "COL is 0-based" in text and "VS Code's 'Col 9' is --col 8" in text


@pytest.mark.parametrize("how, usage", [
    ("script", "usage: maskfill-engine "),
    ("module", "usage: python -m engine "),
])
def test_help_names_the_command_the_user_typed(how: str, usage: str) -> None:
    """Issue 21.6: `maskfill-engine --help` said `usage: python -m engine`."""
    script = Path(sys.executable).parent / "maskfill-engine"
    if how == "script" and not script.exists():
        pytest.skip("the maskfill-engine console script is not installed beside this python")
    command = [str(script)] if how == "script" else [sys.executable, "-m", "engine"]
    for args in (["--help"], ["serve", "--help"]):
        proc = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(usage), proc.stdout[:200]
