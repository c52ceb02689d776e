"""engine/setup/gpu_wheels.py: which carried wheels a GPU machine's interpreter gets, and from
where."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.setup import gpu_wheels

ROOT = Path(__file__).resolve().parents[2]
IMAGE = {"pytest": "9.0.1", "typing_extensions": "4.12.2", "attrs": "26.1.0"}  # no server pkgs


def test_an_image_without_the_server_packages_gets_them_and_the_plugins(monkeypatch):
    monkeypatch.setattr(gpu_wheels, "installed", IMAGE.get)
    install, refused = gpu_wheels.wanted()
    assert refused == {}
    assert set(install) == {"msgspec", "typing_extensions", "cattrs", "lsprotocol", "pygls",
                            "pytest-asyncio", "pytest-lsp"}  # attrs: the image's is new enough


def test_the_pytest_plugins_are_refused_under_an_old_pytest(monkeypatch):
    monkeypatch.setattr(gpu_wheels, "installed", {**IMAGE, "pytest": "8.3.5"}.get)
    install, refused = gpu_wheels.wanted()
    assert "pytest-asyncio" not in install and "pytest-lsp" not in install
    assert "needs pytest>=8.4" in refused["pytest-asyncio"]


def test_wheel_files_are_found_by_normalized_name_and_pinned_version(tmp_path):
    for name in ("msgspec-0.23.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "pytest_asyncio-1.5.0-py3-none-any.whl", "pytest_asyncio-1.4.0-py3-none-any.whl",
                 "typing_extensions-4.16.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    found = gpu_wheels._wheel_file(tmp_path, "pytest-asyncio", "1.5.0")
    assert found is not None and found.name.startswith("pytest_asyncio-1.5.0-")
    assert gpu_wheels._wheel_file(tmp_path, "msgspec", "0.23.0") is not None
    assert gpu_wheels._wheel_file(tmp_path, "pygls", "2.1.1") is None


def test_install_without_the_wheels_says_what_is_missing_and_fails(tmp_path):
    """A real run against an empty folder, by an interpreter without site-packages (-S: like
    an image with none of the packages, pytest included): one JSON line naming what stays
    missing and why the plugins are refused, exit 1."""
    done = subprocess.run([sys.executable, "-S", "-m", "engine.setup.gpu_wheels", "install",
                           "--target", str(tmp_path / "site"), "--wheels", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["installed"] == []
    assert report["missing"] == ["msgspec", "attrs", "typing_extensions", "cattrs", "lsprotocol",
                                 "pygls"]
    assert set(report["refused"]) == {"pytest-asyncio", "pytest-lsp"}
    assert "make gpu-wheels" in report["error"]
