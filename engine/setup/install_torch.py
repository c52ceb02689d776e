"""Install torch into an environment: the CPU build where the PyTorch CPU index answers.

    python -m engine.setup.install_torch [--spec torch==2.13.0] [--index URL] [--python PY]

A bare `torch==X` from PyPI is, on Linux, the CUDA build plus ~15 `nvidia-*` packages and triton
(several GB). The PyTorch CPU index serves `X+cpu` (~200 MB), so it is tried first, after a probe
with a short timeout: pip itself retries an unreachable index for about two minutes (5 retries,
backing off) before it gives up, which is what a user of the README's CPU recipe saw. Where the
probe fails, or the index answers but the install fails, pip installs the spec from its usual
sources (PyPI, or the mirrors, find-links and wheels the machine's pip is configured with). Either
way the last line says which build arrived, from where, and what to do when it is not the CPU
build one wanted. An environment that already has torch keeps it (a CUDA build installed on
purpose stays).

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_SPEC = "torch==2.13.0"
DEFAULT_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0  # connect + first answer; a blackholed network waits this long, once
# pip's own limits for the index install: one retry, not five with back-off.
PIP_NETWORK_ARGS = ["--timeout", "20", "--retries", "1"]
WHAT_TORCH = (
    "import json, torch; v = torch.version; "
    "print(json.dumps([torch.__version__, v.cuda, getattr(v, 'hip', None)]))"
)


def probe(index: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `index` serves a torch page, else why not (one short phrase)."""
    url = urllib.parse.urljoin(index.rstrip("/") + "/", "torch/")  # PEP 503: <index>/torch/
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 - a URL we build
            answer.read(1)
            return None
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return f"{url} is unreachable ({exc.reason})"
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        return f"{url} is unreachable ({type(exc).__name__}: {exc})"


def installed(python: str) -> tuple[str, str | None, str | None] | None:
    """(version, CUDA version, HIP version) of the torch `python` imports, or None."""
    done = subprocess.run([python, "-c", WHAT_TORCH], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return None
    version, cuda, hip = json.loads(done.stdout.strip().splitlines()[-1])
    return version, cuda, hip


def describe(found: tuple[str, str | None, str | None]) -> str:
    version, cuda, hip = found
    if cuda:
        return f"torch {version}, a CUDA {cuda} build"
    if hip:
        return f"torch {version}, a ROCm {hip} build"
    return f"torch {version}, a CPU build"


def pip_install(python: str, args: list[str]) -> bool:
    command = [python, "-m", "pip", "install", "-q", *args]
    print("torch: " + " ".join(command), flush=True)
    return subprocess.run(command, stdin=subprocess.DEVNULL).returncode == 0


def install(spec: str, index: str | None, python: str, probe_timeout_s: float) -> int:
    if (found := installed(python)) is not None:
        print(f"torch: {describe(found)}, is already installed; kept")
        return 0
    source = None
    why_not = "no index given" if not index else probe(index, probe_timeout_s)
    if why_not is None:
        if pip_install(python, [*PIP_NETWORK_ARGS, "--index-url", index, spec]):
            source = index
        else:
            why_not = f"installing from {index} failed"
    if source is None:
        print(f"torch: the CPU index is not used: {why_not}; installing {spec} from pip's usual "
              "sources", flush=True)
        if not pip_install(python, [spec]):
            print(f"torch: pip could not install {spec} (see above)", file=sys.stderr)
            return 1
        source = "pip's usual sources"
    found = installed(python)
    if found is None:
        print(f"torch: {spec} installed but `import torch` fails", file=sys.stderr)
        return 1
    print(f"torch: got {describe(found)}, from {source}")
    if found[1] and source != index:
        print("torch: that is the CUDA build with its nvidia-* packages (several GB). For the CPU "
              "build, make the index reachable (a proxy: https_proxy=...; a mirror: "
              "TORCH_INDEX=URL) or install a CPU wheel file first (pip install "
              "torch-...+cpu-....whl), then run this again.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.setup.install_torch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=DEFAULT_SPEC, help=f"what to install ({DEFAULT_SPEC})")
    parser.add_argument("--index", default=DEFAULT_INDEX,
                        help=f"the index tried first ({DEFAULT_INDEX}); empty: skip it")
    parser.add_argument("--python", default=sys.executable,
                        help="the environment's interpreter (default: this one)")
    parser.add_argument("--probe-timeout-s", type=float, default=PROBE_TIMEOUT_S,
                        help="how long the index may take to answer")
    args = parser.parse_args(argv)
    return install(args.spec, args.index or None, args.python, args.probe_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
