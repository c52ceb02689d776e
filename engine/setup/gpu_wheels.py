"""The wheels a lent GPU machine's stock image lacks, fetched here and installed there.

    python -m engine.setup.gpu_wheels download [--dest .whl]      # here (make gpu-wheels): needs
    PyPI
    python -m engine.setup.gpu_wheels install --target DIR [--wheels .whl]   # there: no network

The device image has Python 3.12, a CUDA torch, transformers, tokenizers, safetensors, numpy
and pytest, but not the LSP server's packages nor the pytest plugins of its tests
(design/gpu-runbook.md). `download` saves the cp312 manylinux (or pure) wheels of the pins below
into an ignored folder that a device call carries; `install` puts those the interpreter lacks
(missing, or older than the pin) into DIR with `pip install --no-index --no-deps --target`,
and prints one JSON line: what it installed, and what stays missing (then it exits 1). Stdlib
only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_DIR = Path(".whl")
# (distribution, pinned version, what it needs of the image), in one place. The versions are
# those this project's CI runs. Pure Python but msgspec; cattrs needs typing_extensions >= 4.14,
# newer than the image may have.
WHEELS: tuple[tuple[str, str, str], ...] = (
    ("msgspec", "0.23.0", ""),
    ("attrs", "26.1.0", ""),
    ("typing_extensions", "4.16.0", ""),
    ("cattrs", "26.2.1", ""),
    ("lsprotocol", "2025.0.0", ""),
    ("pygls", "2.1.1", ""),
    ("pytest-asyncio", "1.5.0", "pytest>=8.4"),
    ("pytest-lsp", "1.0.1", "pytest>=8.4"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PYTHON = "3.12"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:4])


def installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _needs_met(needs: str) -> str | None:
    """None when the image meets `needs` ("dist>=version" or ""), else why not."""
    if not needs:
        return None
    name, floor = needs.split(">=")
    have = installed(name)
    if have is None or _version(have) < _version(floor):
        return f"needs {needs}, the interpreter has {name} {have or 'none'}"
    return None


def wanted() -> tuple[list[str], dict[str, str]]:
    """(distributions to install, {distribution: why it cannot be}) for this interpreter."""
    install, refused = [], {}
    for name, pin, needs in WHEELS:
        have = installed(name)
        if have is not None and _version(have) >= _version(pin):
            continue
        why = _needs_met(needs)
        if why:
            refused[name] = why
        else:
            install.append(name)
    return install, refused


def _wheel_file(folder: Path, distribution: str, pin: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", distribution).lower()
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if name.lower() == stem and version == pin:
            return wheel
    return None


def install(target: Path, folder: Path = DEFAULT_DIR) -> dict:
    """Install the wanted wheels from `folder` into `target`; a JSON-able report."""
    names, refused = wanted()
    pins = {name: pin for name, pin, _ in WHEELS}
    files, absent = [], []
    for name in names:
        wheel = _wheel_file(folder, name, pins[name])
        (files.append(wheel) if wheel else absent.append(name))
    report: dict = {"target": str(target), "installed": [], "missing": absent,
                    "refused": refused}
    if absent:
        report["error"] = f"no wheel of {', '.join(absent)} in {folder} (make gpu-wheels here, " \
                          "then carry the folder)"
    if files:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", "--disable-pip-version-check", "--target", str(target),
             *map(str, files)], capture_output=True, text=True)
        if done.returncode == 0:
            report["installed"] = [f.name for f in files]
        else:
            report["error"] = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            report["missing"] = names
    return report


def download(dest: Path = DEFAULT_DIR) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON, "--implementation", "cp", "-d", str(dest),
               "--disable-pip-version-check"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [f"{name}=={pin}" for name, pin, _ in WHEELS]
    print(" ".join(command[1:]), flush=True)
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.setup.gpu_wheels",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch the pinned wheels (here, with PyPI)")
    d.add_argument("--dest", type=Path, default=DEFAULT_DIR)
    i = sub.add_parser("install", help="install what this interpreter lacks (no network)")
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--wheels", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.command == "download":
        return download(args.dest)
    report = install(args.target, args.wheels)
    print(json.dumps(report), flush=True)
    return 1 if report.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
