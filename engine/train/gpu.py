"""`make train-gpu`: train, export and evaluate the embedded model in one timed script.

    python -m engine.train.gpu --out DIR [--minutes 6] [--total-minutes 7.5] [--preset gpu]
                               [--device cuda] [--eval-tasks 100] [--dry-run]

Built for one call of a lent GPU machine (design/gpu-runbook.md): no network, the machine's own
Python installation as the corpus, at most 8 files of at most 16 MiB coming back. Phases, each
timed and logged:
1. corpus: select the standard library and installed packages (decontaminated against HumanEval,
   engine/train/corpus.py) and tokenize it once in a process pool (engine/train/token_corpus.py);
2. train for --minutes of wall-clock time (engine/train/trainer.py; bf16, fused AdamW, torch.compile
   on CUDA with an eager fallback), shortened when needed so everything ends by --total-minutes;
3. export the checkpoint (Dream layout, bf16, safetensors shards of at most 15 MB);
4. evaluate it: `engine.eval.harness --suite humaneval-single --limit N` (tasks spread over the
suite);
5. pack DIR: the weight shards, TRAINING.md (the run's record) and checkpoint-rest.tar.gz (config,
   shard index, tokenizer, corpus manifest, log, eval record and completions). Unpack the archive
   next to the shards and the folder is a complete checkpoint: `tar xzf checkpoint-rest.tar.gz`.

It never skips a phase quietly: a failure prints which phase broke and why and exits 1, leaving
DIR/train-gpu.log (written line by line as the run goes, so a killed call returns it too) and,
when training got as far as saving, the checkpoint. DIR/train-gpu.json, the run's record (its
plan, each phase's status and seconds, the environment, the summary), is rewritten at every
phase change. The work folder (run state, tokenized corpus) stays outside DIR (--work).

The defaults fit ONE device call of at most 540 s worst case, start-up included: everything
ends by --total-minutes (7.5), the eval subprocess at most 30 s past it, then the last pack.
`--dry-run` prints that plan, its last line one JSON object with `worst_case_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

from engine.train.run_record import JsonRecord

BUDGET_S = 540.0  # one device call, worst case, start-up included (design/gpu-runbook.md)
STARTUP_S = 20.0  # make, the interpreter, torch's import
EVAL_GRACE_S = 30.0  # engine.eval.harness may run this long past the deadline (run_eval)
PACK_S = 15.0  # the last pack, after the eval
DEFAULT_TOTAL_MINUTES = 7.5
PROGRESS = "train-gpu.json"
MAX_FILES = 8  # what one device call brings back
MAX_FILE_BYTES = 16 * 2**20
ARCHIVE = "checkpoint-rest.tar.gz"
LOG = "train-gpu.log"
RUN_SECTION = "\n## This run (`make train-gpu`)"
EVAL_SUITE = "humaneval-single"


class Tee:
    """Writes to a stream and a log file (the training log goes to stderr)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from engine.train.trainer import PRESETS

    default_out = Path(os.environ["OUT"]) / "train-gpu" if os.environ.get("OUT") else Path(
        "runs/train-gpu")
    p = argparse.ArgumentParser(prog="python -m engine.train.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=default_out,
                   help="folder for what comes back (default $OUT/train-gpu, else "
                        "runs/train-gpu); must be empty or absent")
    p.add_argument("--work", type=Path, default=None,
                   help="run folder: state, tokenized corpus (default: a new temporary folder)")
    p.add_argument("--minutes", type=float, default=6.0, help="training wall-clock budget")
    p.add_argument("--total-minutes", type=float, default=DEFAULT_TOTAL_MINUTES,
                   help="everything (corpus, training, export, eval) ends by then; the training "
                        f"budget shrinks to fit (default {DEFAULT_TOTAL_MINUTES:g}: one device "
                        "call)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and its worst case (one JSON line last); run nothing")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--device", default="cuda", help="cuda (fails without CUDA) or cpu")
    p.add_argument("--eval-tasks", type=int, default=100,
                   help=f"{EVAL_SUITE} tasks spread over the suite (0: no eval)")
    p.add_argument("--eval-timeout", type=float, default=5.0, help="seconds per test program")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--steps", type=int, default=None, help="also stop after this many steps")
    p.add_argument("--corpus-bytes", type=int, default=None, help="override the preset's")
    p.add_argument("--batch-rows", type=int, default=None, help="override the preset's batch")
    p.add_argument("--workers", type=int, default=None,
                   help="corpus processes (default: one per CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=25, help="steps per loss-curve point")
    return p.parse_args(argv)


def plan(ns: argparse.Namespace) -> dict:
    """The phases' caps: training ends by the total minus the eval's reserve, the eval by the
    total (plus its grace), then the last pack."""
    total = ns.total_minutes * 60
    reserve = eval_reserve_s(ns)
    phases = [{"name": "environment, corpus, training, export", "cap_s": round(total - reserve, 1)},
              {"name": "pack, eval", "cap_s": round(reserve + EVAL_GRACE_S, 1)},
              {"name": "pack", "cap_s": PACK_S}]
    return {"budget_s": BUDGET_S, "startup_s": STARTUP_S,
            "worst_case_s": STARTUP_S + sum(p["cap_s"] for p in phases),
            "minutes": ns.minutes, "total_minutes": ns.total_minutes, "phases": phases}


def print_plan(ns: argparse.Namespace) -> int:
    planned = plan(ns)
    print(f"{'phase':<40} {'cap s':>7}")
    print(f"{'(start-up)':<40} {STARTUP_S:>7.0f}")
    for phase in planned["phases"]:
        print(f"{phase['name']:<40} {phase['cap_s']:>7.0f}")
    print(f"worst case {planned['worst_case_s']:.0f} s of a {BUDGET_S:.0f} s device call")
    print(json.dumps({"dry_run": True, **planned}))
    return 0 if planned["worst_case_s"] <= BUDGET_S else 1


class Progress(JsonRecord):
    """train-gpu.json: the plan, then each phase as it starts and ends."""

    def __init__(self, path: Path, ns: argparse.Namespace, started: float):
        super().__init__(path, {"plan": plan(ns), "phases": [], "finished": False})
        self.started = started
        self.write()

    def begin(self, name: str) -> str:
        self._close("done")
        self.data["phases"].append({"name": name, "status": "running",
                                    "started_s": self._now()})
        self.write()
        return name

    def end(self, ok: bool, error: str | None = None, **facts) -> None:
        self._close("done" if ok else "failed")
        if error:
            self.data["error"] = error
        self.data.update(facts, finished=True, ok=ok, seconds=self._now())
        self.write()

    def _close(self, status: str) -> None:
        if self.data["phases"] and self.data["phases"][-1]["status"] == "running":
            self.data["phases"][-1].update(status=status, ended_s=self._now())

    def _now(self) -> float:
        return round(time.time() - self.started, 1)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.dry_run:
        return print_plan(ns)
    started = time.time()
    if ns.out.exists() and any(ns.out.iterdir()):
        print(f"error: {ns.out} is not empty", file=sys.stderr)
        return 2
    ns.out.mkdir(parents=True, exist_ok=True)
    work = ns.work or Path(tempfile.mkdtemp(prefix="maskfill-train-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    # The log is written into DIR as it goes: a call killed at its time limit still returns it.
    log_path = ns.out / LOG
    phase, state, env, record = "setup", None, {}, None
    phases: dict[str, float] = {}
    progress = Progress(ns.out / PROGRESS, ns, started)
    with log_path.open("w", encoding="utf-8", buffering=1) as log_file:  # line-buffered
        real_stderr = sys.stderr
        sys.stderr = Tee(real_stderr, log_file)
        try:
            say(f"work folder {work}, output {ns.out}")
            phase = progress.begin("environment")
            env = environment(ns.device)
            say("environment: " + json.dumps(env))
            progress.data["environment"] = env

            # corpus selection, tokenization, training and export
            phase = progress.begin("training")
            stop_by = started + ns.total_minutes * 60 - eval_reserve_s(ns)
            checkpoint = run_training(ns, run, stop_by)
            state = json.loads((run / "state" / "train_state.json").read_text())
            phases.update(state.get("phases", {}))

            progress.data["training"] = {k: state.get(k) for k in ("step", "tokens", "compile")}
            phase = progress.begin("pack")  # before the eval: a failing eval cannot lose weights
            finish_record(ns, env, state, phases, None, checkpoint, work, started)
            pack(checkpoint, work, ns.out)

            phase = progress.begin("eval")
            t = time.monotonic()
            record = run_eval(ns, checkpoint, work, deadline=started + ns.total_minutes * 60)
            phases["eval_s"] = round(time.monotonic() - t, 2)
            progress.data["eval"] = record

            phase = progress.begin("pack")
            summary = finish_record(ns, env, state, phases, record, checkpoint, work, started)
            # The log is in the archive now; the plain copy is removed below.
            files = [f for f in pack(checkpoint, work, ns.out) if f.name != LOG]
            say(f"done in {time.time() - started:.0f} s; {ns.out}: " + ", ".join(
                f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in files))
            print(json.dumps({**summary, "out": str(ns.out),
                              "files": [f.name for f in files]}), flush=True)
            ok = True
            progress.end(True, summary=summary)
        except BaseException as exc:  # report every failure, then exit non-zero
            ok = False
            say(f"FAILED in phase {phase} after {time.time() - started:.0f} s: "
                f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            progress.end(False, f"{phase}: {type(exc).__name__}: {exc}")
            salvage(run, work, ns.out, phase)
        finally:
            sys.stderr.flush()
            sys.stderr = real_stderr
    if ok:
        log_path.unlink()  # it is in the archive
    return 0 if ok else 1


def salvage(run: Path, work: Path, out: Path, phase: str) -> None:
    """After a failed training phase, ship the checkpoint it saved if there is one."""
    checkpoint = run / "checkpoint"
    if phase != "training" or not (checkpoint / "config.json").is_file():
        return
    try:
        files = pack(checkpoint, work, out)
        say("packed the checkpoint saved before the failure: " + ", ".join(f.name for f in files))
    except Exception as exc:  # the failure above is the one to report
        say(f"could not pack the saved checkpoint: {exc}")


def finish_record(ns, env, state, phases, record, checkpoint: Path, work: Path,
                  started: float) -> dict:
    """TRAINING.md with this run's section, and summary.json; returns the summary."""
    phases.pop("total_s", None)
    phases["total_s"] = round(time.time() - started, 2)
    base = (checkpoint / "TRAINING.md").read_text(encoding="utf-8").split(RUN_SECTION)[0]
    report = base.rstrip("\n") + "\n" + run_record(ns, env, state, phases, record)
    (checkpoint / "TRAINING.md").write_text(report, encoding="utf-8")
    summary = {"phases_s": phases, "steps": state["step"], "tokens": state["tokens"],
               "tokens_per_s": steady_rate(state), "compile": state["compile"], "eval": record}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def say(msg: str) -> None:
    print(f"[train-gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def environment(device: str) -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "cpus": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available (torch "
                               f"{torch.__version__}, CUDA build {torch.version.cuda})")
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["bf16"] = torch.cuda.is_bf16_supported()
        if not facts["bf16"]:
            raise RuntimeError(f"{facts['gpu']} does not support bf16 autocast")
    elif torch.cuda.is_available():
        say(f"WARNING: CUDA is available but --device {device} trains on the CPU")
    return facts


def eval_reserve_s(ns: argparse.Namespace) -> float:
    """Seconds kept after training for export, the eval subprocess and packing."""
    per_task = 0.4 if ns.device.startswith("cuda") else 3.0
    return 45.0 + per_task * ns.eval_tasks


def run_training(ns: argparse.Namespace, run: Path, stop_by: float) -> Path:
    from engine.train import trainer as train

    argv = ["--preset", ns.preset, "--out", str(run), "--minutes", str(ns.minutes),
            "--stop-by", f"{stop_by:.1f}", "--device", ns.device, "--compile", ns.compile,
            "--save-every", "0", "--log-every", str(ns.log_every)]
    for flag, value in (("--steps", ns.steps), ("--corpus-bytes", ns.corpus_bytes),
                        ("--batch-rows", ns.batch_rows),
                        ("--workers", ns.workers), ("--threads", ns.threads)):
        if value is not None:
            argv += [flag, str(value)]
    say("python -m engine.train " + " ".join(argv))
    return train.train(argv)


def run_eval(ns: argparse.Namespace, checkpoint: Path, work: Path, deadline: float) -> dict | None:
    """engine.eval.harness in a subprocess (a fresh process: the training's memory is gone)."""
    if ns.eval_tasks <= 0:
        say("eval: --eval-tasks 0, not run")
        return None
    dump = work / "eval-completions.jsonl"
    argv = [sys.executable, "-m", "engine.eval", "--suite", EVAL_SUITE, "--model",
            str(checkpoint), "--limit", str(ns.eval_tasks), "--device",
            "cuda" if ns.device.startswith("cuda") else "cpu", "--no-overlap", "--dump", str(dump),
            "--timeout", str(ns.eval_timeout), "--workers", str(min(8, os.cpu_count() or 1))]
    timeout = max(30.0, deadline - time.time() + 30.0)  # the deadline, plus grace
    say(" ".join(argv[1:]) + f" (timeout {timeout:.0f} s)")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"engine.eval.harness ran past {timeout:.0f} s") from exc
    for line in (done.stderr.splitlines()[-20:] + done.stdout.splitlines()):
        say(f"eval | {line}")
    if done.returncode != 0:
        raise RuntimeError(f"engine.eval.harness exited {done.returncode}: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    (work / "eval.json").write_text(json.dumps(record, indent=1))
    return record


def steady_rate(state: dict) -> float:
    seconds = state["seconds"] - state.get("first_step_s", 0.0)
    tokens = state["tokens"] - state.get("first_step_tokens", 0)
    return round(tokens / seconds) if seconds > 0 else 0.0


def run_record(ns, env: dict, state: dict, phases: dict, record: dict | None) -> str:
    rows = "\n".join(f"| {k.removesuffix('_s').replace('_', ' ')} | {v:.1f} |"
                     for k, v in phases.items())
    if record is None:
        evaluation = "not run yet" if ns.eval_tasks > 0 else "not run (--eval-tasks 0)"
    else:
        evaluation = (f"{EVAL_SUITE}, {record['tasks']} tasks spread over the suite: pass@1 "
                      f"{record['pass_at_1']:.1%}, empty completions "
                      f"{record['empty_completions']}, ms p50 {record['ms_p50']} on "
                      f"{record['device']} (engine defaults; corpus overlap checked at selection)")
    command = (f"python -m engine.train.gpu --preset {ns.preset} --minutes {ns.minutes:g} "
               f"--total-minutes {ns.total_minutes:g} --device {ns.device}")
    return f"""{RUN_SECTION}
`{command}`
- machine: {env.get('gpu') or 'CPU only'}, {env['cpus']} CPUs, Python {env['python']}, torch
  {env['torch']} (CUDA build {env['cuda_build']})
- steps {state['step']}, tokens {state['tokens']:,} ({steady_rate(state):,.0f} tokens/s after the
  first step, which took {state.get('first_step_s', 0.0):.1f} s); torch.compile {state['compile']}
- evaluation: {evaluation}

| phase | seconds |
|---|---|
{rows}
"""


def pack(checkpoint: Path, work: Path, out: Path) -> list[Path]:
    """Shards and TRAINING.md as files, the rest of the checkpoint plus logs in one archive."""
    shards = sorted(checkpoint.glob("*.safetensors"))
    for shard in shards:
        shutil.copy(shard, out / shard.name)
    shutil.copy(checkpoint / "TRAINING.md", out / "TRAINING.md")
    partial = out / (ARCHIVE + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for f in sorted(checkpoint.iterdir()):
            if f.suffix != ".safetensors":
                tar.add(f, arcname=f.name)
        for extra in (work / "summary.json", work / "eval.json",
                      work / "eval-completions.jsonl", out / LOG):
            if extra.is_file():
                sys.stderr.flush()
                tar.add(extra, arcname=f"train-gpu/{extra.name}")
    os.replace(partial, out / ARCHIVE)
    files = sorted(out.iterdir())
    too_big = [f.name for f in files if f.stat().st_size > MAX_FILE_BYTES]
    if len(files) > MAX_FILES or too_big:
        raise RuntimeError(f"{out} holds {len(files)} files (at most {MAX_FILES} come back), "
                           f"over {MAX_FILE_BYTES} bytes: {too_big}")
    return files


if __name__ == "__main__":
    raise SystemExit(main())
