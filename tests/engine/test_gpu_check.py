"""make gpu-check and make train-gpu as a lent GPU's one call needs them (issue 19), on a CPU:
the plans fit the call, the record survives a kill, and no process a step started outlives it.
Everything runs through real subprocesses; the steps of a test plan are small Python programs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process tracking reads /proc")


def run_module(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def step(name: str, code: str, cap_s: float) -> dict:
    return {"name": name, "argv": ["-c", textwrap.dedent(code)], "cap_s": cap_s}


SPAWNER = """
import os, subprocess, sys, time
pid_file, role = sys.argv[1], sys.argv[2]


def note():
    with open(pid_file, "a") as f:
        f.write(f"{os.getpid()}\\n")


def detached(role):  # a session of its own, as the shared engine is started
    subprocess.Popen([sys.executable, __file__, pid_file, role], start_new_session=True)


if role in ("hang", "exit"):  # the step: starts a detached child, then hangs or exits
    detached("child")
    while role == "exit" and (not os.path.exists(pid_file) or
                              len(open(pid_file).read().split()) < 2):
        time.sleep(0.05)
    time.sleep(300 if role == "hang" else 0)
    print("step done")
else:
    note()
    if role == "child":
        detached("grandchild")
    time.sleep(300)
"""


def spawner_step(tmp_path: Path, name: str, pid_file: Path, role: str, cap_s: float) -> dict:
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER)
    return {"name": name, "argv": [str(script), str(pid_file), role], "cap_s": cap_s}


def pids(pid_file: Path, count: int) -> list[int]:
    wait_for(lambda: pid_file.is_file() and len(pid_file.read_text().split()) >= count)
    return [int(p) for p in pid_file.read_text().split()]


def record(out: Path) -> dict:
    return json.loads((out / gpu_check.RECORD).read_text())


# ---- the plans


def test_gpu_check_plans_one_call_most_valuable_first():
    done = run_module("engine.bench.gpu_check", "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    steps = plan["steps"]
    assert plan["worst_case_s"] == plan["startup_s"] + sum(
        s["cap_s"] + plan["kill_grace_s"] for s in steps)
    assert plan["worst_case_s"] <= 540 and plan["budget_s"] == 540
    names = [s["name"] for s in steps]
    measured = names[names.index("7b bench"):]  # after the wheels and the environment
    assert measured == ["7b bench", "gpu tests", "server bench", "7b bench, other quant modes"]
    first, rest = steps[names.index("7b bench")], steps[-1]
    assert "--quant none,fp8" in first["command"] and "--quant int8,int4" in rest["command"]


def test_train_gpu_plans_one_call_by_default(tmp_path):
    done = run_module("engine.train.gpu", "--dry-run", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["worst_case_s"] == plan["startup_s"] + sum(p["cap_s"] for p in plan["phases"])
    assert plan["worst_case_s"] <= 540
    assert not (tmp_path / "out").exists()  # a dry run touches nothing
    too_long = run_module("engine.train.gpu", "--dry-run", "--total-minutes", "12")
    assert too_long.returncode == 1
    assert json.loads(too_long.stdout.strip().splitlines()[-1])["worst_case_s"] > 540


# ---- the record


def start_check(tmp_path: Path, steps: list[dict], *extra: str) -> tuple[subprocess.Popen, Path]:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(steps))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "engine.bench.gpu_check", "--plan", str(plan),
                             "--out", str(out), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, out


def running(out: Path, name: str) -> bool:
    try:
        return record(out)["steps"][name]["status"] == "running"
    except (OSError, ValueError, KeyError):
        return False


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_check_leaves_the_finished_steps_on_record(tmp_path, how):
    """Killed mid-step (SIGKILL: the device call's hard end; SIGTERM: an outer `timeout`), the
    record is valid JSON with the finished step's figures and the log holds its output."""
    pid_file = tmp_path / "sleeper.pid"
    steps = [step("first", 'print("first step output")\nprint(\'{"figure": 42}\')', 60),
             step("second", f"""
                  import os, time
                  open({str(pid_file)!r}, "w").write(str(os.getpid()))
                  time.sleep(300)""", 120),
             step("third", 'print("never")', 60)]
    proc, out = start_check(tmp_path, steps)
    try:
        wait_for(lambda: running(out, "second") and pid_file.is_file())
        proc.send_signal(getattr(signal, how))
        proc.wait(30)
        sleeper = int(pid_file.read_text())
        found = record(out)
        assert found["steps"]["first"]["status"] == "ok"
        assert found["steps"]["first"]["figures"] == {"figure": 42}
        assert "first step output" in (out / gpu_check.LOG).read_text()
        if how == "SIGKILL":  # nothing could clean up: the record says what was under way
            assert found["steps"]["second"]["status"] == "running"
            assert found["finished"] is False
        else:
            assert proc.returncode == 1 and found["finished"] is True
            assert found["steps"]["second"]["status"] == "killed"
            assert found["steps"]["third"]["status"] == "skipped"
            assert any("stopped by SIGTERM" in f for f in found["failures"])
            assert not alive(sleeper)
    finally:
        proc.kill()
        proc.wait()
        if pid_file.is_file() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


# ---- processes


def test_every_process_a_step_started_is_gone_when_it_times_out_or_ends(tmp_path):
    """A step that times out and one that exits leaving processes behind: their detached
    children and grandchildren (new sessions, as the shared engine) are all ended."""
    timed_out, left_behind = tmp_path / "timed_out.pids", tmp_path / "left_behind.pids"
    steps = [spawner_step(tmp_path, "times out", timed_out, "hang", 5),
             spawner_step(tmp_path, "leaves processes", left_behind, "exit", 60)]
    proc, out = start_check(tmp_path, steps, "--budget-s", "200", "--startup-s", "0")
    try:
        proc.wait(120)
        found = record(out)
        assert found["steps"]["times out"]["status"] == "timed out"
        assert found["steps"]["times out"]["processes_ended"] >= 2
        assert found["steps"]["leaves processes"]["status"] == "ok"
        assert found["steps"]["leaves processes"]["processes_ended"] >= 2
        every = pids(timed_out, 2) + pids(left_behind, 2)
        assert not [pid for pid in every if alive(pid)]
    finally:
        proc.kill()
        proc.wait()
        for pid_file in (timed_out, left_behind):
            for pid in (pids(pid_file, 0) if pid_file.is_file() else []):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_a_step_the_budget_cannot_hold_is_skipped_with_why(tmp_path):
    steps = [step("slow", 'import time\ntime.sleep(5)\nprint("ran")', 10),
             step("too late", 'print("ran")', 60)]
    proc, out = start_check(tmp_path, steps, "--budget-s", "16", "--startup-s", "0")
    proc.wait(60)
    found = record(out)
    assert found["steps"]["slow"]["status"] == "ok"
    late = found["steps"]["too late"]
    assert late["status"] == "skipped" and "of the budget left" in late["error"]
    assert proc.returncode == 1 and any("too late: not run" in f for f in found["failures"])
