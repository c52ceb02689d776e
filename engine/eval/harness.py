"""FIM evaluation harness: `python -m engine.eval --suite SUITE [--model M] [--limit N] [--dump F]`.

Suites (benchmark data ships in engine/eval/benchmarks/; --data-dir DIR or $MASKFILL_BENCHMARK_DIR
read another copy laid out the same way):
- humaneval-single  HumanEval single-line infilling (1033): pass@1, tests executed in a sandbox
- humaneval-multi   HumanEval multi-line infilling (5815): pass@1
- santacoder-py     SantaCoder-FIM Python (1043): exact match of the first non-empty line, and
                    pass@1 of that line executed with the row's tests
- demo-holes        maskfill's own hand-written holes (engine/eval/demo_holes.py): share of
                    non-empty completions whose completed file parses
- latency-1k        median completion latency at ~1000 tokens of context (demo code); a model
                    whose window is shorter sees less, and the record says how much
- crossfile-py      the local cross-file set (engine/eval/crossfile.py): exact match, edit
                    similarity and identifier EM/F1 per context condition (none, windows,
                    imports, both, oracle), the context sent in the request's `extra`
- jsonl:PATH        any file of {task_id, prompt, suffix} records; scored like HumanEval when they
                    also carry `test` and `entry_point`

Protocol, stated because results depend on it: greedy decoding (the engine's default threshold
sampler) with the engine's span buckets up to --max-tokens; single-line suites keep the first
line of the completion and end it with a newline. The program run for a HumanEval-style record is
prompt + completion + suffix + "\\n" + test + "\\n" + f"check({entry_point})".

Output: a table, then ONE JSON line (last line on stdout) with pass_at_1 (fraction or null),
tasks, passes_per_token, ms_p50, model. `--dump` writes {task_id, completion} lines;
`--completions` scores such a file instead of running a model (with the stats a dump carries,
so `--shard` runs can be merged: cat their dumps and score the result). When the model folder
carries the training-corpus manifest (our embedded model), the word-10-gram overlap between the
benchmark's reference programs and that corpus is measured and printed.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import statistics
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from engine.api import CompletionRequest, EngineError, QuantMode
from engine.eval.benchmark_data import HUMANEVAL_MULTI, HUMANEVAL_SINGLE, SANTACODER, benchmark_file
from engine.eval.sandbox import network_isolation, run_program
from engine.stop import stop_for_cursor
from engine.train.corpus import CorpusManifest, load_corpus_texts, word_ngrams

OVERLAP_FLAG_SHARE = 0.5  # a reference program with half its 10-grams in the corpus is "seen"
LATENCY_CONTEXT_TOKENS = 1000  # latency-1k: tokens of code around the cursor (3:1 before:after)


@dataclass
class Task:
    task_id: str
    prompt: str
    suffix: str
    canonical: str | None = None  # the reference middle
    test: str | None = None
    entry_point: str | None = None
    program_style: str | None = None  # "humaneval" | "santacoder" | None (not executable)
    stop: str | None = None  # per-task stop mode (demo holes); else the suite's


@dataclass(frozen=True)
class SuiteSpec:
    stop: str  # stop mode sent to the engine
    max_tokens: int
    first_line: bool  # keep only the first (non-empty) line of the completion
    metric: str  # "pass@1" | "exact_match" | "parses" | "latency" | "none"


SUITE_SPECS = {
    "humaneval-single": SuiteSpec("line", 32, True, "pass@1"),
    "humaneval-multi": SuiteSpec("free", 64, False, "pass@1"),
    # SantaCoder prompts stop at the end of the line above the hole: the answer is the next line.
    "santacoder-py": SuiteSpec("free", 32, True, "exact_match"),
    # Per task, the stop mode the editor's `auto` setting picks at the cursor (engine.stop).
    "demo-holes": SuiteSpec("auto", 64, False, "parses"),
    "latency-1k": SuiteSpec("auto", 32, False, "latency"),
    "jsonl": SuiteSpec("free", 64, False, "pass@1"),
}


@dataclass
class Scored:
    task: Task
    completion: str
    ms: float | None = None
    forward_passes: int = 0
    committed: int = 0
    context_tokens: int = 0
    status: str | None = None  # sandbox outcome
    passed: bool | None = None
    exact_match: bool | None = None
    parses: bool | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- suites


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read {path}: {' '.join(str(exc).split())}") from None


def load_tasks(suite: str, data_dir: Path | None = None) -> tuple[list[Task], SuiteSpec]:
    """A suite's tasks; benchmark files come from `data_dir` (engine/eval/benchmark_data.py)."""
    if suite in ("humaneval-single", "humaneval-multi"):
        name = HUMANEVAL_SINGLE if suite == "humaneval-single" else HUMANEVAL_MULTI
        rows = read_jsonl(benchmark_file(name, data_dir))
        tasks = [Task(r["task_id"], r["prompt"], r["suffix"], r["canonical_solution"], r["test"],
                      r["entry_point"], "humaneval") for r in rows]
    elif suite == "santacoder-py":
        rows = [r for r in read_jsonl(benchmark_file(SANTACODER, data_dir))
                if r["language"] == "py"]
        tasks = [Task(r["name"], r["prompt"], r["suffix"], r["canonical_solution"], r["tests"],
                      None, "santacoder") for r in rows]
    elif suite == "demo-holes":
        from engine.eval.demo_holes import demo_holes

        tasks = [Task(h.task_id, h.prompt, h.suffix, h.reference, stop=h.stop)
                 for h in demo_holes()]
    elif suite == "latency-1k":
        tasks = []  # built from the engine's tokenizer in run_latency
    elif suite.startswith("jsonl:"):
        return _jsonl_tasks(Path(suite.removeprefix("jsonl:"))), SUITE_SPECS["jsonl"]
    else:
        raise EngineError(f"unknown suite {suite!r} (humaneval-single, humaneval-multi, "
                          "santacoder-py, demo-holes, latency-1k, crossfile-py, jsonl:PATH)")
    return tasks, SUITE_SPECS[suite]


def _jsonl_tasks(path: Path) -> list[Task]:
    tasks = []
    for i, r in enumerate(read_jsonl(path)):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(
                r.get("suffix"), str):
            raise EngineError(f"{path}: record {i + 1} lacks string fields 'prompt' and 'suffix'")
        executable = isinstance(r.get("test"), str) and isinstance(r.get("entry_point"), str)
        tasks.append(Task(str(r.get("task_id", i)), r["prompt"], r["suffix"],
                          r.get("canonical_solution"), r.get("test"), r.get("entry_point"),
                          "humaneval" if executable else None))
    return tasks


def spread(tasks: list[Task], limit: int | None) -> list[Task]:
    """`limit` tasks evenly spaced over the suite (deterministic), so a partial run still covers
    every problem rather than the first few."""
    if limit is None or limit >= len(tasks):
        return tasks
    return [tasks[i * len(tasks) // limit] for i in range(limit)]


# ----------------------------------------------------------------------------- scoring


def first_line(text: str, non_empty: bool) -> str:
    lines = text.split("\n")
    if non_empty:
        lines = [ln for ln in lines if ln.strip()] or [""]
    return lines[0]


def postprocess(completion: str, spec: SuiteSpec, task: Task) -> str:
    """Shape a raw completion the way the suite's protocol reads it."""
    if spec.first_line:
        line = first_line(completion, non_empty=task.program_style == "santacoder")
        return line + "\n" if task.program_style == "humaneval" else line
    return completion


def build_program(task: Task, completion: str) -> str | None:
    if task.program_style == "humaneval":
        return (task.prompt + completion + task.suffix + "\n" + task.test + "\n"
                + f"check({task.entry_point})\n")
    if task.program_style == "santacoder":
        # As the benchmark copy's manifest joins a row: prompt(+\n) middle (\n) suffix \n tests.
        prompt = task.prompt if task.prompt.endswith("\n") else task.prompt + "\n"
        glue = "" if task.suffix.startswith("\n") else "\n"
        return prompt + completion + glue + task.suffix + "\n" + task.test
    return None


def score(results: list[Scored], spec: SuiteSpec, timeout_s: float, workers: int) -> None:
    """Fill in pass/exact-match/parse verdicts in place (executions run in parallel)."""
    runnable = [r for r in results if build_program(r.task, r.completion) is not None]
    if runnable and spec.metric in ("pass@1", "exact_match"):
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            outcomes = pool.map(
                lambda r: run_program(build_program(r.task, r.completion), timeout_s), runnable)
            for r, outcome in zip(runnable, outcomes, strict=True):
                r.status, r.passed = outcome.status, outcome.passed
                if not outcome.passed:
                    r.extra["detail"] = outcome.detail[-300:]
    for r in results:
        if r.task.program_style == "santacoder" and r.task.canonical is not None:
            r.exact_match = r.completion.strip() == r.task.canonical.strip()
        if spec.metric == "parses" and r.completion.strip():
            try:
                ast.parse(r.task.prompt + r.completion + r.task.suffix)
                r.parses = True
            except SyntaxError:
                r.parses = False


# ----------------------------------------------------------------------------- generation


def generate(engine, tasks: list[Task], spec: SuiteSpec, ns: argparse.Namespace) -> list[Scored]:
    from tqdm import tqdm

    results = []
    for task in tqdm(tasks, desc="completing", unit="task", file=sys.stderr,
                     mininterval=1.0 if sys.stderr.isatty() else 30.0):
        request = CompletionRequest(
            prefix=task.prompt, suffix=task.suffix,
            max_tokens=max(ns.span_lengths) if ns.span_lengths else (
                ns.max_tokens or spec.max_tokens),
            span_lengths=ns.span_lengths, stop=ns.stop or task.stop or spec.stop,
            sampler=ns.sampler, threshold=ns.threshold, seed=ns.seed)
        started = time.perf_counter()
        result = engine.complete(request)
        ms = (time.perf_counter() - started) * 1000.0
        st = result.stats
        results.append(Scored(task, postprocess(result.text, spec, task), ms=ms,
                              forward_passes=st.forward_passes, committed=st.committed_tokens,
                              context_tokens=st.prefix_tokens + st.suffix_tokens))
    return results


def latency_tasks(engine, n: int = 20, context_tokens: int = LATENCY_CONTEXT_TOKENS
                  ) -> list[Task]:
    """Cursor positions inside ~1000 tokens of demo code (3:1 before:after), not benchmark text.
    The engine cuts what its window cannot hold: the record's context_tokens_mean says what the
    model really saw."""
    from engine.eval.demo_holes import DEMO_FILES, full_source

    code = "\n\n".join(full_source(name) for name in DEMO_FILES)
    ids = engine.tokenizer.encode(code)
    while len(ids) < 2 * context_tokens:
        code += "\n\n" + code
        ids = engine.tokenizer.encode(code)
    n_prefix = context_tokens * 3 // 4
    tasks = []
    for i in range(n):
        cut = n_prefix + i * (len(ids) - context_tokens) // n
        prefix = engine.tokenizer.decode(ids[cut - n_prefix : cut])
        suffix = engine.tokenizer.decode(ids[cut : cut - n_prefix + context_tokens])
        stop = stop_for_cursor(prefix.rsplit("\n", 1)[-1], suffix.split("\n", 1)[0])
        tasks.append(Task(f"latency/{i}", prefix, suffix, stop=stop))
    return tasks


# ----------------------------------------------------------------------------- overlap


def corpus_overlap(model_dir: Path | None, tasks: list[Task]) -> dict | None:
    """Share of each reference program's word 10-grams found in the recorded training corpus."""
    manifest_path = None if model_dir is None else Path(model_dir) / "corpus.json.gz"
    if manifest_path is None or not manifest_path.is_file():
        return None
    manifest = CorpusManifest.load(manifest_path)
    docs: dict[str, set[int]] = {}
    for t in tasks:
        text = t.prompt + (t.canonical or "") + t.suffix + "\n" + (t.test or "")
        if text not in docs:
            docs[text] = word_ngrams(text)
    wanted: set[int] = set().union(*docs.values()) if docs else set()
    texts, missing = load_corpus_texts(manifest)
    found: set[int] = set()
    for text in texts:
        found |= wanted.intersection(word_ngrams(text))
    shares = [len(g & found) / len(g) for g in docs.values() if g]
    return {
        "corpus_files": len(manifest.files),
        "corpus_files_unavailable": missing,
        "corpus_list_sha256": manifest.list_hash,
        "reference_programs": len(docs),
        "programs_sharing_any_ngram": sum(s > 0 for s in shares),
        "programs_over_half_seen": sum(s >= OVERLAP_FLAG_SHARE for s in shares),
        "max_share": round(max(shares, default=0.0), 4),
        "mean_share": round(statistics.fmean(shares), 4) if shares else 0.0,
    }


def overlap_finding(ov: dict | None) -> str:
    if ov is None:
        return "overlap: no training-corpus manifest next to the model; not checked"
    checked = ov["corpus_files"] - ov["corpus_files_unavailable"]
    verdict = ("no sign of contamination" if ov["programs_over_half_seen"] == 0
               else "POSSIBLE CONTAMINATION")
    return (f"overlap: {ov['reference_programs']} reference programs vs {checked} corpus files "
            f"({ov['corpus_files_unavailable']} unavailable here): "
            f"{ov['programs_sharing_any_ngram']} share any word 10-gram, "
            f"{ov['programs_over_half_seen']} share >= {OVERLAP_FLAG_SHARE:.0%} "
            f"(max {ov['max_share']:.1%}) -> {verdict}")


# ----------------------------------------------------------------------------- report


def summarize(results: list[Scored], spec: SuiteSpec) -> dict:
    n = len(results)
    ms = [r.ms for r in results if r.ms is not None]
    committed = sum(r.committed for r in results)
    executed = [r for r in results if r.passed is not None]
    em = [r for r in results if r.exact_match is not None]
    non_empty = [r for r in results if r.parses is not None]
    out = {
        "tasks": n,
        "pass_at_1": (sum(r.passed for r in executed) / len(executed)) if executed else None,
        "exact_match": (sum(r.exact_match for r in em) / len(em)) if em else None,
        "timeouts": sum(r.status == "timeout" for r in results),
        "empty_completions": sum(not r.completion.strip() for r in results),
        "passes_per_token": (sum(r.forward_passes for r in results) / committed
                             if committed else None),
        "ms_p50": round(statistics.median(ms), 1) if ms else None,
        "ms_p95": round(_percentile(ms, 0.95), 1) if ms else None,
    }
    if spec.metric == "parses":
        out["parse_share"] = (sum(r.parses for r in non_empty) / len(non_empty)
                              if non_empty else None)
        out["non_empty"] = len(non_empty)
    if any(r.context_tokens for r in results):
        out["context_tokens_mean"] = round(statistics.fmean(r.context_tokens for r in results), 1)
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_table(rows: Iterable[tuple[str, object]]) -> None:
    rows = list(rows)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.4f}" if value < 10 else f"{value:.1f}"
        print(f"  {key:<{width}}  {value}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="humaneval-single",
                   help="humaneval-single | humaneval-multi | santacoder-py | demo-holes | "
                        "latency-1k | crossfile-py | jsonl:PATH")
    p.add_argument("--model", default=None, help="checkpoint folder or HF id (default: embedded)")
    p.add_argument("--limit", type=int, default=None, help="N tasks spread evenly over the suite")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only every N-th task starting at I (0-based), after --limit; "
                        "for splitting a long run over processes")
    p.add_argument("--dump", type=Path, default=None, help="write {task_id, completion} lines")
    p.add_argument("--completions", type=Path, default=None,
                   help="score these {task_id, completion} lines instead of running a model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quant", default="none", choices=get_args(QuantMode))
    p.add_argument("--max-tokens", type=int, default=None, help="span budget (suite default)")
    p.add_argument("--span-lengths", default=None,
                   help="comma-separated fixed hole lengths, e.g. 16 or 8,16,32 (default: the "
                        "engine's buckets up to --max-tokens)")
    p.add_argument("--stop", choices=["line", "block", "free"], default=None)
    p.add_argument("--sampler", default="threshold")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per test program")
    p.add_argument("--workers", type=int, default=2, help="test programs run in parallel")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-overlap", action="store_true", help="skip the corpus overlap check")
    p.add_argument("--data-dir", "--benchmark-dir", dest="data_dir", type=Path, default=None,
                   help="folder with the benchmark files (default: $MASKFILL_BENCHMARK_DIR, else "
                        "the copy shipped in engine/eval/benchmarks/)")
    p.add_argument("--context-reuse", choices=["on", "off"], default="on",
                   help="reuse the previous task's encoded context where it matches (engine)")
    p.add_argument("--conditions", default=None,
                   help="crossfile-py: comma-separated context conditions (default: none,"
                        "windows,imports,both,oracle)")
    p.add_argument("--extra-tokens", type=int, default=None,
                   help="crossfile-py: the stored context budget to send (default: the largest "
                        "within half the model's context)")
    ns = p.parse_args(argv)
    if ns.limit is not None and ns.limit < 1:
        p.error("--limit must be at least 1")
    if ns.shard is not None:
        try:
            index, count = (int(x) for x in ns.shard.split("/"))
            if not 0 <= index < count:
                raise ValueError
        except ValueError:
            p.error(f"--shard: expected I/N with 0 <= I < N, got {ns.shard!r}")
        ns.shard = (index, count)
    if ns.span_lengths is not None:
        try:
            ns.span_lengths = tuple(int(x) for x in ns.span_lengths.split(","))
        except ValueError:
            p.error(f"--span-lengths: expected integers like 8,16,32, got {ns.span_lengths!r}")
    return ns


def _from_dump(task: Task, line: dict, spec: SuiteSpec) -> Scored:
    """A dumped completion; the generation stats come along when the dump has them (a merged
    set of --shard dumps then reports the same latency and passes as one run would)."""
    if not isinstance(line.get("completion"), str):
        raise EngineError(f"completion for task {task.task_id!r} is not a string")
    return Scored(task, postprocess(line["completion"], spec, task), ms=line.get("ms"),
                  forward_passes=int(line.get("forward_passes") or 0),
                  committed=int(line.get("committed_tokens") or 0),
                  context_tokens=int(line.get("context_tokens") or 0))


def resolve_model(spec: str | None) -> str:
    if spec is not None:
        return spec
    from engine.model.embedded_model import default_model_path

    path = default_model_path()
    if path is None:
        raise EngineError("no --model given and no embedded model is installed "
                          "(train one with `python -m engine.train`)")
    return str(path)


def run(ns: argparse.Namespace) -> dict:
    if ns.suite == "crossfile-py":  # its own conditions and scores (engine/eval/crossfile.py)
        from engine.eval.crossfile import evaluate

        return evaluate(ns, resolve_model(ns.model))
    suite_name = "jsonl" if ns.suite.startswith("jsonl:") else ns.suite
    tasks, spec = load_tasks(ns.suite, ns.data_dir)
    engine = model_label = model_dir = window = None
    if ns.completions is None:
        import torch

        from engine.engine import Engine

        torch.set_num_threads(ns.threads)
        model_label = resolve_model(ns.model)
        engine = Engine.load(model_label, device=ns.device, quant=ns.quant,
                             context_reuse=ns.context_reuse == "on")
        model_dir = Path(engine.info().path)
        window = engine.info().max_context
        if suite_name == "latency-1k":
            tasks = latency_tasks(engine)
    tasks = spread(tasks, ns.limit)
    if ns.shard is not None:
        tasks = tasks[ns.shard[0] :: ns.shard[1]]

    if ns.completions is not None:
        given = {str(r["task_id"]): r for r in read_jsonl(ns.completions)}
        missing = [t.task_id for t in tasks if t.task_id not in given]
        if missing:
            raise EngineError(f"{ns.completions}: no completion for task {missing[0]!r} "
                              f"({len(missing)} missing)")
        results = [_from_dump(t, given[t.task_id], spec) for t in tasks]
        models = {given[t.task_id].get("model") for t in tasks}
        source = models.pop() if len(models) == 1 and None not in models else None
        model_label = (f"{source} (from {ns.completions})" if source
                       else f"completions:{ns.completions}")
        if source and Path(source).is_dir():
            model_dir = Path(source)  # for the overlap check
    else:
        results = generate(engine, tasks, spec, ns)
        engine.close()

    if ns.dump is not None:
        with ns.dump.open("w", encoding="utf-8") as fh:
            for r in results:
                fh.write(json.dumps({"task_id": r.task.task_id, "completion": r.completion,
                                     "model": model_label, "ms": r.ms,
                                     "forward_passes": r.forward_passes,
                                     "committed_tokens": r.committed,
                                     "context_tokens": r.context_tokens}) + "\n")

    score(results, spec, ns.timeout, ns.workers)
    summary = summarize(results, spec)
    overlap = None
    if not ns.no_overlap and spec.metric in ("pass@1", "exact_match"):
        overlap = corpus_overlap(model_dir, tasks)
        print(overlap_finding(overlap))

    if suite_name == "latency-1k":
        summary["context_tokens_requested"] = LATENCY_CONTEXT_TOKENS
        summary["window"] = window
        seen = summary.get("context_tokens_mean") or 0
        if seen < 0.9 * LATENCY_CONTEXT_TOKENS:
            print(f"note: the model's {window}-token window cut the context to {seen:.0f} tokens "
                  f"on average: this is not a {LATENCY_CONTEXT_TOKENS}-token-context latency")
    print(f"suite {ns.suite} · model {model_label} · sandbox: {network_isolation()}")
    print_table([(k, v) for k, v in summary.items() if v is not None])
    record = {"suite": ns.suite, "model": model_label, **summary,
              "shard": None if ns.shard is None else f"{ns.shard[0]}/{ns.shard[1]}",
              "stop": ns.stop or spec.stop, "max_tokens": ns.max_tokens or spec.max_tokens,
              "span_lengths": ns.span_lengths,
              "sampler": ns.sampler, "device": ns.device, "quant": ns.quant,
              "context_reuse": ns.context_reuse,
              "corpus_overlap": overlap}
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        run(ns)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
