"""The engine's GPU entry points run with only torch and the model libraries (issue 19).

A lent GPU machine's stock image has torch, transformers, tokenizers, safetensors, numpy and
pytest, not the LSP server's packages nor its tests' pytest plugins. Each check runs in a real
subprocess with those packages made unimportable (tests/fixtures/hidden_packages: a meta-path
blocker installed by a sitecustomize on PYTHONPATH) and pytest plugins not auto-loaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIDE = Path(__file__).resolve().parents[1] / "fixtures" / "hidden_packages"
SERVER_PACKAGES = ("msgspec", "pygls", "lsprotocol", "cattrs", "aiohttp", "pytest_asyncio",
                   "pytest_lsp")
ENTRY_MODULES = ("engine", "engine.__main__", "engine.engine", "engine.api",
                 "engine.bench.gpu_check",
                 "engine.setup.gpu_wheels", "engine.train.gpu", "engine.bench.suite",
                 "engine.bench.shapes",
                 "engine.bench.reuse", "engine.model.quantize", "engine.train.trainer",
                 "engine.eval.harness",
                 "engine.eval.reuse_quality")


def stock_image(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(HIDE), str(ROOT))),
           "MASKFILL_HIDE_MODULES": ",".join(SERVER_PACKAGES),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_the_packages_are_really_hidden():
    for module in SERVER_PACKAGES:
        done = stock_image("-c", f"import {module}")
        assert done.returncode != 0 and "hidden by the test" in done.stderr, module


def test_entry_modules_import_without_the_server_packages():
    code = (f"import sys\nfor m in {ENTRY_MODULES!r}: __import__(m)\n"
            f"print(sorted(set({SERVER_PACKAGES!r}) & set(sys.modules)))")
    done = stock_image("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [
    ["-m", "engine", "--help"], ["-m", "engine", "bench", "--help"],
    ["-m", "engine", "complete", "--help"], ["-m", "engine.train.gpu", "--help"],
    ["-m", "engine.train", "--help"], ["-m", "engine.eval", "--help"],
    ["-m", "engine.bench.gpu_check", "--help"], ["-m", "engine.setup.gpu_wheels", "--help"],
], ids=lambda argv: " ".join(argv[1:]))
def test_help_works_without_the_server_packages(argv):
    done = stock_image(*argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_dry_runs_plan_without_the_server_packages(tmp_path):
    for argv in (["-m", "engine.bench.gpu_check", "--dry-run"],
                 ["-m", "engine.train.gpu", "--dry-run", "--out", str(tmp_path / "train")]):
        done = stock_image(*argv)
        assert done.returncode == 0, done.stderr
        assert last_json(done.stdout)["worst_case_s"] <= 540


def test_a_completion_runs_without_the_server_packages(tmp_path):
    """`python -m engine complete --json` with the embedded model: the engine loads, denoises
    and prints its result without msgspec."""
    source = tmp_path / "add.py"
    source.write_text("def add(a, b):\n    return \n")
    done = stock_image("-m", "engine", "complete", "--file", str(source), "--line", "2",
                       "--col", "11", "--max-tokens", "8", "--json")
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert result["stats"]["forward_passes"] >= 1 and isinstance(result["text"], str)


def test_gpu_tests_collect_without_the_server_packages():
    """`pytest -m gpu` on the stock image: every GPU module that needs none of the packages
    collects; one that does is skipped, naming the package; nothing errors."""
    done = stock_image("-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-rs",
                       "-p", "no:cacheprovider", "tests")
    assert done.returncode == 0, done.stdout[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    for module in ("test_gpu.py", "test_gpu_static.py", "test_memorized.py", "test_parity.py"):
        assert any(f"tests/engine/{module}::" in line for line in collected), module
    # the first server package that its imports reach, as the stock image lacks them all
    assert re.search(r"tests/lsp/test_doctor.py:0: needs (msgspec|lsprotocol), which is "
                     r"not installed", done.stdout)
