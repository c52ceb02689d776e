"""`make setup`'s torch step (engine/setup/install_torch.py), run as make runs it, in a fresh venv:
the CPU index is used where it answers; where it does not, pip is never pointed at it (no retry
storm) and the spec comes from pip's usual sources; the last line says which build arrived.

The index is a real HTTP server on loopback serving a PEP 503 page, and the package is a tiny
wheel named torch that only answers the installer's question (version, CUDA); the real torch
wheel is 200 MB and this machine has no route to download.pytorch.org."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import os
import socket
import subprocess
import threading
import venv
import zipfile
from pathlib import Path

import pytest

from engine.setup import install_torch

ROOT = Path(__file__).resolve().parents[2]


def tiny_torch_wheel(folder: Path, version: str, cuda: str | None) -> Path:
    """A wheel called torch whose `torch.__version__` and `torch.version.cuda` are given."""
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\nfrom torch import version\n",
        "torch/version.py": f"cuda = {cuda!r}\nhip = None\n",
        f"torch-{version}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"torch-{version}.dist-info/WHEEL":
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"torch-{version}.dist-info/RECORD,,")
    files[f"torch-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


@contextlib.contextmanager
def simple_index(root: Path, wheel: Path | None):
    """A PEP 503 index on loopback: /simple/torch/ lists `wheel` (a 404 when None)."""
    if wheel is not None:
        page = root / "simple" / "torch"
        page.mkdir(parents=True)
        (root / "files").mkdir()
        (root / "files" / wheel.name).write_bytes(wheel.read_bytes())
        href = "../../files/" + wheel.name.replace("+", "%2B")
        (page / "index.html").write_text(f'<html><body><a href="{href}">{wheel.name}</a>'
                                         "</body></html>\n")
    else:
        (root / "simple").mkdir(parents=True)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"  # nothing listens there now: refused at once


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    venv.create(folder, with_pip=True)
    return folder


def run_setup_step(python: Path, index: str, fallback_wheels: Path | str | None
                   ) -> tuple[int, str]:
    """The Makefile's torch step, with pip cut off from this machine's config and its wheels
    (its real torch wheel): pip's usual sources are only `fallback_wheels` (a folder, or the
    URL of another index)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if isinstance(fallback_wheels, Path):
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(fallback_wheels))
    elif fallback_wheels is not None:
        env.update(PIP_INDEX_URL=fallback_wheels)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torch"], env=env,
                   capture_output=True)
    done = subprocess.run(
        [str(python), "-m", "engine.setup.install_torch", "--spec", "torch==2.13.0", "--index",
         index],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout + done.stderr


def test_the_probe_names_why_an_index_is_unusable(tmp_path):
    refused = install_torch.probe(closed_port_url(), timeout_s=5)
    assert refused is not None and "unreachable" in refused, refused
    nowhere = install_torch.probe("http://maskfill-no-such-host.invalid/whl/cpu", timeout_s=5)
    assert nowhere is not None and "unreachable" in nowhere, nowhere
    with simple_index(tmp_path, None) as url:
        assert "answered HTTP 404" in install_torch.probe(url, timeout_s=5)


@pytest.mark.slow
def test_a_reachable_cpu_index_is_used(fresh_venv, tmp_path):
    wheel = tiny_torch_wheel(tmp_path / "build", "2.13.0+cpu", None)
    python = fresh_venv / "bin" / "python"
    with simple_index(tmp_path / "index", wheel) as url:
        code, out = run_setup_step(python, url, fallback_wheels=None)
    assert code == 0, out
    assert f"--index-url {url} torch==2.13.0" in out, out
    assert f"torch: got torch 2.13.0+cpu, a CPU build, from {url}" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("index", ["refused", "no torch page"])
def test_an_unusable_index_falls_back_without_a_retry_storm(fresh_venv, tmp_path, index):
    local = tiny_torch_wheel(tmp_path / "wheels", "2.13.0+cpu", None)
    python = fresh_venv / "bin" / "python"
    with simple_index(tmp_path / "index", None) as empty:
        url = closed_port_url() if index == "refused" else empty
        code, out = run_setup_step(python, url, fallback_wheels=local.parent)
    assert code == 0, out
    # pip is never pointed at the unusable index: that is where its two minutes of retries were.
    assert "--index-url" not in out, out
    assert "torch: the CPU index is not used:" in out, out
    assert "torch: got torch 2.13.0+cpu, a CPU build, from pip's usual sources" in out, out


@pytest.mark.slow
def test_an_index_without_the_version_falls_back(fresh_venv, tmp_path):
    older = tiny_torch_wheel(tmp_path / "build", "2.12.0+cpu", None)
    wanted = tiny_torch_wheel(tmp_path / "build2", "2.13.0+cpu", None)
    with simple_index(tmp_path / "index", older) as url, \
            simple_index(tmp_path / "usual", wanted) as usual:
        code, out = run_setup_step(fresh_venv / "bin" / "python", url, fallback_wheels=usual)
    assert code == 0, out
    assert f"the CPU index is not used: installing from {url} failed" in out, out
    assert "torch: got torch 2.13.0+cpu, a CPU build, from pip's usual sources" in out, out
    assert "torch: got torch 2.13.0+cpu, a CPU build, from pip's usual sources" in out, out


@pytest.mark.slow
def test_a_cuda_build_from_the_fallback_is_called_what_it_is(fresh_venv, tmp_path):
    cuda = tiny_torch_wheel(tmp_path / "wheels", "2.13.0", "12.8")
    code, out = run_setup_step(fresh_venv / "bin" / "python", closed_port_url(),
                               fallback_wheels=cuda.parent)
    assert code == 0, out
    assert "torch: got torch 2.13.0, a CUDA 12.8 build, from pip's usual sources" in out, out
    assert "For the CPU build, make the index reachable" in out, out


@pytest.mark.slow
def test_an_installed_torch_is_kept(fresh_venv, tmp_path):
    python = fresh_venv / "bin" / "python"
    cuda = tiny_torch_wheel(tmp_path / "wheels", "2.13.0", "12.8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(cuda)], env=env, check=True)
    done = subprocess.run([str(python), "-m", "engine.setup.install_torch", "--index",
                           closed_port_url()], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch: torch 2.13.0, a CUDA 12.8 build, is already installed; kept" in done.stdout
    assert "pip install" not in done.stdout


def test_the_makefile_runs_this_step_with_an_overridable_index():
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_INDEX ?= {install_torch.DEFAULT_INDEX}" in makefile
    assert '$(PY) -m engine.setup.install_torch --spec "$(TORCH)" --index "$(TORCH_INDEX)"' in makefile  # noqa: E501
