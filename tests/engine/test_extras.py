"""Hints for a missing optional package name the packages and the interpreter, never
`maskfill[extra]` (which, outside the project's own venv, pip resolves to an unrelated PyPI project
called maskfill); the extras they come from are the ones pyproject.toml declares."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine.setup import extras

ROOT = Path(__file__).resolve().parents[2]


def test_the_fallback_extras_are_pyprojects():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = declared["optional-dependencies"]
    for extra, packages in extras.EXTRAS.items():
        assert optional[extra] == packages, extra
    # transformers is the bench's, not every install's (issue 21.1: 133 MB and 15 packages).
    assert not any(dep.startswith("transformers") for dep in declared["dependencies"])


@pytest.mark.parametrize("extra", sorted(extras.EXTRAS))
def test_a_hint_installs_the_packages_into_this_interpreter(extra):
    hint = extras.install_hint(extra)
    words = shlex.split(hint)
    assert words[:4] == [sys.executable, "-m", "pip", "install"], hint
    assert words[4:] == extras.requirements(extra) and words[4:], hint
    assert "maskfill" not in " ".join(words[4:]), hint


def test_serve_http_without_aiohttp_prints_a_hint_that_cannot_reach_the_wrong_package(tmp_path):
    # An aiohttp that is not there, as in an environment installed without the serve extra.
    (tmp_path / "aiohttp").mkdir()
    (tmp_path / "aiohttp" / "__init__.py").write_text(
        "raise ImportError('No module named aiohttp (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--no-socket", "--http", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env,
        cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: --http needs aiohttp and prometheus-client"), line
    assert f"{shlex.quote(sys.executable)} -m pip install 'aiohttp>=3.9' " \
        "'prometheus-client>=0.20'" in line, line
    assert "maskfill[" not in line, line
    help_text = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--help"], capture_output=True, text=True,
        timeout=120, env=env, cwd=tmp_path).stdout
    assert "maskfill[" not in help_text and "prometheus-client>=0.20" in help_text
