"""`make gpu-check`: every GPU check in one script, sized for ONE call of a lent GPU.

    python -m engine.bench.gpu_check [--out DIR] [--budget-s 540] [--steps a,b] [--dry-run]

A lent GPU gives 15 minutes of device time in all, start-up included (design/gpu-runbook.md):
one call of at most 540 s worst case. The plan puts the most valuable measurement first:
1. wheels: the LSP server's packages from the carried `.whl` folder (make gpu-wheels) into a
   temporary target, when this interpreter lacks them (engine/setup/gpu_wheels.py);
2. environment: torch/CUDA build, the GPU, the xformers probe, what still cannot be imported;
3. the 7B-shape bench of bf16 and the fastest quant mode (fp8 on Hopper: design/engine.md §1,
   request bound at 8 passes 29.6 ms vs int4 37.8, int8 44.3), with the autoregressive peer;
4. the GPU test suite (`pytest -m gpu`);
5. `engine bench --device cuda --quick`: small-shape figures, the LSP server and shared-engine
   benches;
6. the 7B-shape bench of the other quant modes.

Each step is a subprocess under its own cap, and every cap plus start-up fits the budget
(`--dry-run` prints the plan, its last line one JSON object with `worst_case_s`); a step that
finds too little of the budget left is recorded as skipped, with why. Every process a step
started, the shared engine it detaches included, is ended when the step ends or times out
(engine/serve/process_tree.py). The record, gpu-check.json, is rewritten when a step starts and when
it ends, and the log, gpu-check.log, is written line by line, both in DIR (default $OUT when
set, else runs/gpu-check): a call killed at its limit loses only the step in progress.

Nothing fails quietly: on a machine with CUDA, a step that fails, times out or reports an
error makes the script exit 1 and say which step broke and how. It imports no third-party
package itself (it runs before the wheels are installed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from engine.serve import process_tree
from engine.train.run_record import JsonRecord

BUDGET_S = 540.0  # one device call, worst case, start-up included
STARTUP_S = 20.0  # before this script's clock starts: make, the interpreter
KILL_GRACE_S = 2.0  # per step: ending its processes after its cap
MIN_STEP_S = 10.0  # a step offered less than this is skipped
FASTEST_QUANT = "fp8"
OTHER_QUANTS = "int8,int4"
WHEEL_TARGET = Path(tempfile.gettempdir()) / f"maskfill-gpu-wheels-{os.getpid()}"
MEMORIZED_DIR = Path(tempfile.gettempdir()) / f"maskfill-memorized-{os.getpid()}"
RECORD, LOG = "gpu-check.json", "gpu-check.log"


def plan() -> list[dict]:
    """The steps in order: name, argv after the interpreter, cap in seconds."""
    bench_7b = ["-m", "engine", "bench", "--shape", "7b", "--device", "cuda", "--quick"]
    return [
        {"name": "wheels", "cap_s": 30,
         "argv": ["-m", "engine.setup.gpu_wheels", "install", "--target", str(WHEEL_TARGET)]},
        {"name": "environment", "cap_s": 25, "argv": ["-m", "engine.bench.gpu_check", "--facts"]},
        {"name": "7b bench", "cap_s": 140,
         "argv": [*bench_7b, "--quant", f"none,{FASTEST_QUANT}"]},
        {"name": "gpu tests", "cap_s": 110,
         "argv": ["-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider", "tests"]},
        {"name": "server bench", "cap_s": 110,
         "argv": ["-m", "engine", "bench", "--device", "cuda", "--quick"]},
        {"name": "7b bench, other quant modes", "cap_s": 75,
         "argv": [*bench_7b, "--quant", OTHER_QUANTS, "--skip-ar"]},
    ]


def worst_case_s(steps: list[dict], startup_s: float) -> float:
    return startup_s + sum(step["cap_s"] + KILL_GRACE_S for step in steps)


def facts() -> dict:
    """The environment step (run in its own process, so this one never holds the GPU)."""
    out: dict = {"python": sys.version.split()[0]}
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - report whatever broke the import
        return {**out, "error": f"torch does not import: {error}"}
    out.update(torch=torch.__version__, cuda_build=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out.update(device=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_free_gib=round(free / 2**30, 1),
                   memory_total_gib=round(total / 2**30, 1))
        from engine.model.attention import xformers_probe

        out["xformers"] = xformers_probe()[1]
    missing = []
    for module in ("transformers", "tokenizers", "safetensors", "numpy", "msgspec", "pygls",
                   "lsprotocol", "pytest", "pytest_asyncio", "pytest_lsp"):
        try:
            __import__(module)
        except Exception:  # noqa: BLE001
            missing.append(module)
    out["missing_packages"] = missing
    if not out["cuda_available"]:
        out["errors"] = ["CUDA is not available to torch"]
    return out


class Stopped(Exception):
    """SIGTERM/SIGINT/SIGHUP reached the script (an outer `timeout`): end the step, record it."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
    for each in STOP_SIGNALS:  # once: the clean-up that follows must not be interrupted
        signal.signal(each, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def run_step(step: dict, cap: float, log, env: dict) -> dict:
    """Run one step, echoing and logging its output; end every process it started; return
    its status, rc, seconds, last JSON line and pytest summary."""
    started = time.monotonic()
    header = f"\n===== {step['name']}: {' '.join(step['argv'])} (cap {cap:.0f} s)\n"
    print(header, end="", flush=True)
    log.write(header)
    token = secrets.token_hex(8)
    lines: list[str] = []

    def pump(stream) -> None:  # a thread, so that a silent hang still meets the cap
        for line in stream:  # (drained to the end whatever happens to our own stdout)
            lines.append(line)
            for sink in (sys.stdout, log):
                try:
                    sink.write(line)
                    sink.flush()
                except (OSError, ValueError):
                    pass

    result: dict = {}
    proc = reader = None
    try:
        proc = subprocess.Popen(
            [sys.executable, *step["argv"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, errors="replace",
            env={**env, process_tree.TOKEN_ENV: token}, start_new_session=True)
        reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
        reader.start()
        proc.wait(timeout=cap)
    except OSError as error:
        result.update(status="failed", error=f"could not start: {error}")
    except subprocess.TimeoutExpired:
        result.update(status="timed out", error=f"timed out after {cap:.0f} s")
    except Stopped as stop:
        result.update(status="killed", error=f"stopped by {stop} while running")
    finally:
        leader = proc.pid if proc is not None else None
        ended = process_tree.end_step(token, leader, keep_status_of=leader)
        if proc is not None:
            proc.wait()
        if reader is not None:
            reader.join(timeout=5)
    rc, leader = (proc.returncode, proc.pid) if proc is not None else (None, None)
    if not result:
        result = {"status": "ok"} if rc == 0 else {"status": "failed",
                                                   "error": f"exit status {rc}"}
    result.update(rc=rc, cap_s=round(cap), seconds=round(time.monotonic() - started, 1))
    leftovers = [pid for pid in ended if pid != leader]
    if leftovers:
        result["processes_ended"] = len(leftovers)
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
        if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)", line):
            return line.strip().strip("=").strip()
    return None


def _nothing_passed(summary: str | None) -> bool:
    """A GPU suite that ran no test on a GPU machine proves nothing: count it as a failure."""
    return summary is not None and not re.search(r"[1-9]\d* passed", summary)


def _failure(name: str, result: dict) -> str | None:
    figures = result.get("figures")
    if not isinstance(figures, dict):
        figures = {}
    reported = figures.get("errors") or figures.get("error")
    if reported:  # what the step said is worth more than its exit status
        return f"{name}: {result.get('status')}, reported {reported}"
    if "error" in result:
        return f"{name}: {result['error']}"
    if name == "gpu tests" and _nothing_passed(result.get("tests")):
        return f"{name}: no test passed ({result['tests']})"
    if figures.get("missing_packages"):
        return f"{name}: cannot import {figures['missing_packages']}"
    return None


def print_plan(steps: list[dict], budget_s: float, startup_s: float) -> dict:
    summary = {"dry_run": True, "budget_s": budget_s, "startup_s": startup_s,
               "kill_grace_s": KILL_GRACE_S, "worst_case_s": worst_case_s(steps, startup_s),
               "steps": [{"name": s["name"], "cap_s": s["cap_s"],
                          "command": " ".join(["python", *s["argv"]])} for s in steps]}
    print(f"{'step':<30} {'cap s':>6}  command")
    print(f"{'(start-up)':<30} {startup_s:>6.0f}")
    for step in steps:
        print(f"{step['name']:<30} {step['cap_s']:>6.0f}  python {' '.join(step['argv'])}")
    print(f"worst case {summary['worst_case_s']:.0f} s of a {budget_s:.0f} s budget "
          f"(each step's cap + {KILL_GRACE_S:.0f} s to end it, plus start-up)")
    print(json.dumps(summary))
    return summary


def load_plan(path: Path) -> list[dict]:
    steps = json.loads(path.read_text())
    for step in steps:
        if not (isinstance(step.get("name"), str) and isinstance(step.get("argv"), list)
                and isinstance(step.get("cap_s"), (int, float))):
            raise SystemExit(f"{path}: every step needs a name, an argv list and cap_s")
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"the call's worst case, start-up included (default {BUDGET_S:.0f})")
    parser.add_argument("--startup-s", type=float, default=STARTUP_S,
                        help="start-up counted before this script's clock starts")
    parser.add_argument("--steps", default=None, help="comma-separated subset of the steps")
    parser.add_argument("--plan", type=Path, default=None,
                        help="steps from a JSON file instead (a list of {name, argv, cap_s})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and its worst case; run nothing")
    parser.add_argument("--facts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.facts:
        found = facts()
        print(json.dumps(found), flush=True)
        return 1 if found.get("errors") or found.get("error") else 0
    steps = load_plan(args.plan) if args.plan else plan()
    if args.steps:
        wanted = {s.strip() for s in args.steps.split(",")}
        unknown = wanted - {s["name"] for s in steps}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}")
        steps = [s for s in steps if s["name"] in wanted]
    if args.dry_run:
        summary = print_plan(steps, args.budget_s, args.startup_s)
        return 0 if summary["worst_case_s"] <= args.budget_s else 1
    return run_plan(steps, args)


def run_plan(steps: list[dict], args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.budget_s - args.startup_s
    out = args.out or Path(os.environ.get("OUT") or "runs/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    subreaper = process_tree.become_subreaper()
    record = JsonRecord(out / RECORD, {
        "budget_s": args.budget_s, "worst_case_s": worst_case_s(steps, args.startup_s),
        "subreaper": subreaper, "finished": False, "failures": [],
        "steps": {s["name"]: {"status": "pending", "cap_s": s["cap_s"]} for s in steps}})
    record.write()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("MASKFILL_MEMORIZED_DIR", str(MEMORIZED_DIR))  # trained once for all steps
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    failures: list[str] = record.data["failures"]
    try:
        with open(out / LOG, "w", encoding="utf-8", buffering=1) as log:  # line-buffered
            for step in steps:
                if record.data.get("stopped"):
                    record.data["steps"][step["name"]] = {"status": "skipped",
                                                          "error": "not run: stopped"}
                    continue
                name = step["name"]
                left = deadline - time.monotonic() - KILL_GRACE_S
                if left < MIN_STEP_S:  # recorded, and counted as a failure: nothing quietly
                    result = {"status": "skipped",
                              "error": f"not run: {max(left, 0):.0f} s of the budget left"}
                else:
                    cap = min(step["cap_s"], left)
                    record.data["steps"][name] = {"status": "running", "cap_s": cap,
                                                  "since_s": round(time.monotonic() - started)}
                    record.write()
                    result = run_step(step, cap, log, env)
                record.data["steps"][name] = result
                if name == "wheels" and result.get("figures", {}).get("installed"):
                    env["PYTHONPATH"] = os.pathsep.join(
                        p for p in (str(WHEEL_TARGET), env.get("PYTHONPATH")) if p)
                if name == "environment" and "figures" in result:
                    record.data["environment"] = result["figures"]
                failure = _failure(name, result)
                if failure:
                    failures.append(failure)
                if result["status"] == "killed":
                    record.data["stopped"] = True
                record.data["seconds"] = round(time.monotonic() - started, 1)
                record.write()
    except Stopped as stop:  # between two steps: nothing of a step is left running
        failures.append(f"stopped by {stop}")
        record.data["stopped"] = True
        for name, result in record.data["steps"].items():
            if result.get("status") in ("pending", "running"):
                record.data["steps"][name] = {**result, "status": "skipped",
                                              "error": "not run: stopped"}
    record.data["finished"] = True
    record.data["seconds"] = round(time.monotonic() - started, 1)
    record.write()
    print("\n===== gpu-check summary")
    for name, result in record.data["steps"].items():
        status = result.get("error") or result.get("status")
        print(f"{name:<30} {status[:60]:<60} {result.get('seconds', 0):>7} s  "
              f"{result.get('tests', '')}")
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"results in {out / RECORD}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
