"""`make gpu-check`: every GPU check in one script, sized for one call of a lent GPU.

    python -m engine.gpu_check [--out DIR] [--budget-s 450]

Steps, in order, each a subprocess under its own time cap (and all under the budget):
1. environment: torch/CUDA build, the GPU, the xformers probe, the packages the server needs;
2. the GPU test suite (`pytest -m gpu`);
3. the 7B-shape bench on CUDA for every quant mode (`engine bench --shape 7b`);
4. `engine bench --device cuda --quick`: the small-shape figures and the LSP server bench on CUDA.

Nothing is skipped quietly: on a machine with CUDA, a step that fails, times out or reports an
error makes the script exit 1 and say which step broke and how. Results go to DIR (default
$OUT when set, else runs/gpu-check): gpu-check.json (every step's figures) and gpu-check.log
(everything the steps printed), so they come back from a lent machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MEMORIZED_DIR = Path(tempfile.gettempdir()) / f"maskfill-memorized-{os.getpid()}"
STEPS = (  # (name, argv after the interpreter, time cap in seconds)
    ("gpu tests", ["-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider"], 240),
    ("7b bench", ["-m", "engine", "bench", "--shape", "7b", "--device", "cuda", "--quant",
                  "none,int8,int4,fp8", "--quick"], 300),
    ("server bench", ["-m", "engine", "bench", "--device", "cuda", "--quick"], 200),
)


def environment() -> dict:
    facts: dict = {"python": sys.version.split()[0]}
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - report whatever broke the import
        return {**facts, "error": f"torch does not import: {error}"}
    facts.update(torch=torch.__version__, cuda_build=torch.version.cuda,
                 cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        facts.update(device=torch.cuda.get_device_name(0),
                     capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     memory_free_gib=round(free / 2**30, 1),
                     memory_total_gib=round(total / 2**30, 1))
        from engine.attention import xformers_probe

        facts["xformers"] = xformers_probe()[1]
    missing = []
    for module in ("msgspec", "pygls", "lsprotocol", "transformers", "tokenizers", "safetensors",
                   "pytest_asyncio", "pytest_lsp"):
        try:
            __import__(module)
        except Exception:  # noqa: BLE001
            missing.append(module)
    facts["missing_packages"] = missing
    return facts


def run_step(name: str, argv: list[str], cap: float, log) -> dict:
    """Run one step, echoing and logging its output; return rc, seconds and its last JSON."""
    started = time.monotonic()
    header = f"\n===== {name}: {' '.join(argv)} (cap {cap:.0f} s)\n"
    print(header, end="", flush=True)
    log.write(header)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("MASKFILL_MEMORIZED_DIR", str(MEMORIZED_DIR))  # trained once for all steps
    lines: list[str] = []
    try:
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)  # a timeout ends its children too
    except OSError as error:
        return {"rc": None, "seconds": 0.0, "error": f"could not start: {error}"}
    def pump() -> None:  # a thread, so that a silent hang still meets the cap
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            print(line, end="", flush=True)
            log.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    result: dict = {"rc": proc.returncode, "seconds": round(time.monotonic() - started, 1)}
    if timed_out:
        result["error"] = f"timed out after {cap:.0f} s"
    elif proc.returncode != 0:
        result["error"] = f"exit status {proc.returncode}"
    figures = _last_json(lines)
    if figures is not None:
        result["figures"] = figures
    summary = _pytest_summary(lines)
    if summary:
        result["tests"] = summary
    return result


def _last_json(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                return json.loads(text)
            except ValueError:
                return None
    return None


def _pytest_summary(lines: list[str]) -> str | None:
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|errors?|skipped)", line):
            return line.strip().strip("=").strip()
    return None


def _nothing_passed(summary: str | None) -> bool:
    """A GPU suite that ran no test on a GPU machine proves nothing: count it as a failure."""
    return summary is not None and not re.search(r"[1-9]\d* passed", summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget for all steps (default 480 s: under 8 minutes)")
    parser.add_argument("--steps", default=",".join(name for name, _, _ in STEPS),
                        help="comma-separated subset of: " + ", ".join(n for n, _, _ in STEPS))
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or "runs/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict = {"environment": environment(), "steps": {}}
    print(json.dumps(report["environment"]), flush=True)
    failures = []
    if not report["environment"].get("cuda_available"):
        failures.append("environment: CUDA is not available to torch")
    if report["environment"].get("missing_packages"):
        failures.append(f"environment: missing {report['environment']['missing_packages']}")
    wanted = {s.strip() for s in args.steps.split(",")}
    with open(out / "gpu-check.log", "w", encoding="utf-8") as log:
        for name, step_argv, cap in STEPS:
            if name not in wanted:
                continue
            left = args.budget_s - (time.monotonic() - started)
            if left < 20:
                report["steps"][name] = {"error": "no time left in the budget"}
                failures.append(f"{name}: not run (budget spent)")
                continue
            result = run_step(name, step_argv, min(cap, left), log)
            report["steps"][name] = result
            errors = result.get("figures", {}).get("errors") if isinstance(
                result.get("figures"), dict) else None
            if "error" in result:
                failures.append(f"{name}: {result['error']}")
            elif _nothing_passed(result.get("tests")):
                failures.append(f"{name}: no test passed ({result['tests']})")
            if errors:
                failures.append(f"{name}: reported {errors}")
    report["failures"] = failures
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("\n===== gpu-check summary")
    for name, result in report["steps"].items():
        status = result.get("error") or "ok"
        print(f"{name:<14} {status:<40} {result.get('seconds', 0):>7} s  {result.get('tests', '')}")
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"results in {out}/gpu-check.json")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
