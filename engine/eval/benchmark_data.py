"""Where the FIM benchmark files are: shipped in engine/eval/benchmarks/, or a folder the user
names.

The public sets maskfill evaluates (HumanEval-infilling single/multi-line, SantaCoder-FIM) are small
and ship inside the package, so `make eval` and the training corpus's decontamination work on any
clone. A larger or newer copy can replace them: `--data-dir DIR` on the command line, else the
environment variable MASKFILL_BENCHMARK_DIR, else the shipped folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.api import EngineError

BENCHMARK_ENV = "MASKFILL_BENCHMARK_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent / "benchmarks"

HUMANEVAL_SINGLE = "human-eval-infilling/HumanEval-SingleLineInfilling.jsonl.gz"
HUMANEVAL_MULTI = "human-eval-infilling/HumanEval-MultiLineInfilling.jsonl.gz"
SANTACODER = "santacoder-fim/santacoder-fim-task.jsonl.gz"

# Where each file comes from, for the error a missing one raises.
UPSTREAM = {
    "human-eval-infilling": "https://github.com/openai/human-eval-infilling (data/*.jsonl.gz)",
    "santacoder-fim": "https://huggingface.co/datasets/bigcode/santacoder-fim-task (parquet, "
                      "decoded to JSON lines: engine/eval/benchmarks/santacoder-fim/SOURCE)",
}


def benchmark_dir(override: Path | str | None = None) -> Path:
    """The folder to read: `override`, else $MASKFILL_BENCHMARK_DIR, else the shipped copy."""
    if override is not None:
        return Path(override)
    env = os.environ.get(BENCHMARK_ENV, "").strip()
    return Path(env) if env else SHIPPED_DIR


def benchmark_file(name: str, folder: Path | str | None = None) -> Path:
    """Path of a benchmark file (relative name as above); a clear error when it is missing."""
    base = benchmark_dir(folder)
    path = base / name
    if not path.is_file():
        source = ("--data-dir" if folder is not None else
                  f"${BENCHMARK_ENV}" if os.environ.get(BENCHMARK_ENV, "").strip() else
                  "the copy shipped with maskfill")
        upstream = UPSTREAM.get(name.split("/", 1)[0], "its publisher")
        raise EngineError(
            f"benchmark file {name} not found in {base} (from {source}). maskfill ships "
            f"HumanEval-infilling and SantaCoder-FIM in {SHIPPED_DIR}; get this file from "
            f"{upstream} and point --data-dir or {BENCHMARK_ENV} at a folder laid out the same way"
        )
    return path
