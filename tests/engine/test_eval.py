"""engine/eval/harness.py: the executor and scorers on known answers, a real model end to end,
overlap."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from engine.eval import harness as fim_eval
from engine.eval.benchmark_data import HUMANEVAL_SINGLE, benchmark_file
from engine.eval.demo_holes import DEMO_FILES, demo_holes, full_source
from engine.eval.sandbox import run_program
from engine.model.tokenizer import Tokenizer
from engine.train.corpus import CorpusFile, CorpusManifest
from tests.fixtures.memorized import SNIPPETS, split_middle

# HumanEval-shaped records written for these tests (not benchmark data).
TASKS = [
    {"task_id": "t/0", "prompt": "def double(x):\n", "canonical_solution": "    return 2 * x\n",
     "suffix": "", "entry_point": "double",
     "test": "def check(candidate):\n    assert candidate(3) == 6\n    assert candidate(0) == 0\n"},
    {"task_id": "t/1", "prompt": "def last(items):\n    if not items:\n        return None\n",
     "canonical_solution": "    return items[-1]\n", "suffix": "", "entry_point": "last",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == 2\n"
             "    assert candidate([]) is None\n"},
    {"task_id": "t/2", "prompt": "def count_vowels(s):\n    n = 0\n    for ch in s:\n",
     "canonical_solution": "        if ch in 'aeiou':\n",
     "suffix": "            n += 1\n    return n\n", "entry_point": "count_vowels",
     "test": "def check(candidate):\n    assert candidate('banana') == 3\n"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_eval(*args: str) -> dict:
    return fim_eval.run(fim_eval.parse_args(list(args)))


def test_canonical_completions_score_one_and_wrong_ones_zero(tmp_path):
    suite = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    right = write_jsonl(tmp_path / "right.jsonl", [
        {"task_id": t["task_id"], "completion": t["canonical_solution"]} for t in TASKS])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [
        {"task_id": t["task_id"], "completion": "    return 0\n"} for t in TASKS])
    assert run_eval("--suite", f"jsonl:{suite}", "--completions", str(right))["pass_at_1"] == 1.0
    assert run_eval("--suite", f"jsonl:{suite}", "--completions", str(wrong))["pass_at_1"] == 0.0


def test_final_stdout_line_is_the_json_record(tmp_path, capsys):
    suite = write_jsonl(tmp_path / "tasks.jsonl", TASKS[:1])
    done = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "t/0", "completion": "    return x\n"}])
    assert fim_eval.main(["--suite", f"jsonl:{suite}", "--completions", str(done)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(last)
    assert record["pass_at_1"] == 0.0 and record["tasks"] == 1
    assert {"passes_per_token", "ms_p50", "model"} <= record.keys()


def test_a_hanging_completion_times_out_and_fails(tmp_path):
    suite = write_jsonl(tmp_path / "tasks.jsonl", TASKS[:1])
    done = write_jsonl(tmp_path / "c.jsonl", [
        {"task_id": "t/0", "completion": "    while True:\n        pass\n"}])
    record = run_eval("--suite", f"jsonl:{suite}", "--completions", str(done), "--timeout", "1")
    assert record["pass_at_1"] == 0.0 and record["timeouts"] == 1


def test_sandbox_has_no_network_and_runs_in_a_fresh_temporary_directory():
    outcome = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert outcome.status == "failed" and "network access is disabled" in outcome.detail
    outcome = run_program("import os\n"
                          "assert os.path.basename(os.getcwd()).startswith('maskfill-eval-')\n"
                          "assert os.listdir('.') == ['program.py']\n")
    assert outcome.passed


def test_missing_completion_and_bad_records_are_one_line_errors(tmp_path, capsys):
    suite = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    partial = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "t/0", "completion": ""}])
    assert fim_eval.main(["--suite", f"jsonl:{suite}", "--completions", str(partial)]) == 2
    assert "no completion for task 't/1'" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "x"}])
    assert fim_eval.main(["--suite", f"jsonl:{bad}", "--completions", str(partial)]) == 2
    assert "lacks string fields" in capsys.readouterr().err


def test_single_line_protocol_keeps_the_first_line_with_its_newline():
    spec = fim_eval.SUITE_SPECS["humaneval-single"]
    task = fim_eval.Task("x", "", "", program_style="humaneval")
    assert fim_eval.postprocess("    return a\n    more\n", spec, task) == "    return a\n"
    sc_spec = fim_eval.SUITE_SPECS["santacoder-py"]
    sc_task = fim_eval.Task("y", "", "", program_style="santacoder")
    assert fim_eval.postprocess("\n        return False\n", sc_spec, sc_task) == \
        "        return False"


def _snippet_task(tokenizer, index: int, test: str, entry_point: str) -> tuple[dict, int]:
    """A memorized snippet with the middle half of its tokens as the hole (the model memorized
    token sequences, so holes are cut at token boundaries) and the hole's length in tokens."""
    ids = tokenizer.encode(SNIPPETS[index])
    start, end = len(ids) // 4, 3 * len(ids) // 4
    prompt, middle, suffix = split_middle(tokenizer, SNIPPETS[index], start, end)
    return {"task_id": f"memorized/{index}", "prompt": prompt, "canonical_solution": middle,
            "suffix": suffix, "test": test, "entry_point": entry_point}, end - start


@pytest.mark.slow
def test_a_real_model_fills_holes_that_pass_their_tests(memorized_model, tmp_path):
    tokenizer = Tokenizer.from_dir(memorized_model)
    made = [
        _snippet_task(tokenizer, 0, "def check(f):\n    assert f(2, 3) == 5\n", "add"),
        _snippet_task(tokenizer, 1, "def check(f):\n    assert f(4) and not f(5)\n", "is_even"),
        _snippet_task(tokenizer, 4, "def check(f):\n    assert f([1, 2, 3]) == 6\n", "total"),
    ]
    suite = tmp_path / "tasks.jsonl"
    dump = tmp_path / "dump.jsonl"
    records = []
    for row, n in made:  # one fixed hole length per task, the length of its middle
        write_jsonl(suite, [row])
        records.append(run_eval("--suite", f"jsonl:{suite}", "--model", str(memorized_model),
                                "--span-lengths", str(n), "--dump", str(dump),
                                "--threads", "1"))
        assert json.loads(dump.read_text())["completion"] == row["canonical_solution"]
    assert [r["pass_at_1"] for r in records] == [1.0, 1.0, 1.0]
    record = records[-1]
    assert record["tasks"] == 1 and 0 < record["passes_per_token"] < 1
    # The dump re-scores to the same result without the model; a broken middle fails.
    assert run_eval("--suite", f"jsonl:{suite}", "--completions", str(dump))["pass_at_1"] == 1.0
    write_jsonl(dump, [{"task_id": made[-1][0]["task_id"], "completion": " 0"}])
    assert run_eval("--suite", f"jsonl:{suite}", "--completions", str(dump))["pass_at_1"] == 0.0


def test_demo_holes_are_valid_python_with_their_references():
    holes = demo_holes()
    assert len(holes) >= 25
    for name in DEMO_FILES:
        compile(full_source(name), name, "exec")
    results = [fim_eval.Scored(fim_eval.Task(h.task_id, h.prompt, h.suffix), h.reference)
               for h in holes]
    spec = fim_eval.SUITE_SPECS["demo-holes"]
    fim_eval.score(results, spec, timeout_s=5, workers=1)
    assert fim_eval.summarize(results, spec)["parse_share"] == 1.0
    broken = [fim_eval.Scored(r.task, r.completion + " (") for r in results]
    fim_eval.score(broken, spec, timeout_s=5, workers=1)
    assert fim_eval.summarize(broken, spec)["parse_share"] == 0.0


def _manifest_over(tmp_path: Path, files: dict[str, str]) -> Path:
    """A model folder whose corpus manifest lists `files` (name -> text) under one root."""
    import hashlib

    root = tmp_path / "corpus"
    root.mkdir()
    manifest = CorpusManifest(seed=0, max_bytes=0, roots={"r": str(root)})
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
        raw = text.encode()
        manifest.files.append(CorpusFile(f"r/{name}", root / name,
                                         hashlib.sha256(raw).hexdigest(), len(raw)))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    manifest.save(model_dir / "corpus.json.gz")
    return model_dir


def test_overlap_check_flags_a_corpus_that_contains_a_reference_program(tmp_path):
    tasks = [fim_eval.Task(t["task_id"], t["prompt"], t["suffix"], t["canonical_solution"],
                           t["test"], t["entry_point"], "humaneval") for t in TASKS]
    leaked = TASKS[2]
    program = leaked["prompt"] + leaked["canonical_solution"] + leaked["suffix"] + "\n" + \
        leaked["test"]
    model_dir = _manifest_over(tmp_path, {"leak.py": "# copied\n" + program,
                                          "clean.py": "import os\nprint(os.getcwd())\n"})
    found = fim_eval.corpus_overlap(model_dir, tasks)
    assert found["programs_over_half_seen"] == 1 and found["max_share"] == 1.0
    assert "POSSIBLE CONTAMINATION" in fim_eval.overlap_finding(found)

    (tmp_path / "other").mkdir()
    clean = fim_eval.corpus_overlap(_manifest_over(tmp_path / "other", {"clean.py": "x = 1\n"}),
                                    tasks)
    assert clean["programs_sharing_any_ngram"] == 0
    assert "no sign of contamination" in fim_eval.overlap_finding(clean)
    assert fim_eval.corpus_overlap(tmp_path, tasks) is None  # no manifest there


def test_benchmark_canonical_middles_pass_through_the_same_executor(tmp_path):
    with gzip.open(benchmark_file(HUMANEVAL_SINGLE), "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    canon = write_jsonl(tmp_path / "canon.jsonl", [
        {"task_id": r["task_id"], "completion": r["canonical_solution"]} for r in rows])
    record = run_eval("--suite", "humaneval-single", "--completions", str(canon),
                      "--limit", "40")
    assert record["tasks"] == 40 and record["pass_at_1"] == 1.0


def test_cli_help_lists_the_suites(capsys):
    with pytest.raises(SystemExit):
        fim_eval.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "humaneval-single" in out and "jsonl:PATH" in out


def test_shard_dumps_merge_into_one_scored_run_with_their_stats(tmp_path):
    suite = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    lines = [{"task_id": t["task_id"], "completion": t["canonical_solution"], "model": "m",
              "ms": 10.0 * (i + 1), "forward_passes": 2, "committed_tokens": 4,
              "context_tokens": 20} for i, t in enumerate(TASKS)]
    merged = write_jsonl(tmp_path / "merged.jsonl", lines[2:] + lines[:2])  # any order
    record = run_eval("--suite", f"jsonl:{suite}", "--completions", str(merged))
    assert record["tasks"] == 3 and record["pass_at_1"] == 1.0
    assert record["ms_p50"] == 20.0 and record["passes_per_token"] == 0.5
    assert record["model"].startswith("m (from ")
    shard = run_eval("--suite", f"jsonl:{suite}", "--completions", str(merged), "--shard", "1/2")
    assert shard["tasks"] == 1 and shard["shard"] == "1/2"


def test_latency_tasks_carry_about_a_thousand_tokens_of_context():
    from types import SimpleNamespace

    from engine.model.embedded_model import EMBEDDED_DIR

    tok = Tokenizer.from_dir(EMBEDDED_DIR)
    tasks = fim_eval.latency_tasks(SimpleNamespace(tokenizer=tok))
    assert len(tasks) == 20
    for task in tasks:
        n_prefix, n_suffix = len(tok.encode(task.prompt)), len(tok.encode(task.suffix))
        assert abs(n_prefix - 750) <= 10 and abs(n_suffix - 250) <= 10
        assert task.stop in ("line", "block", "free")


@pytest.mark.slow
def test_latency_suite_reports_the_context_the_model_really_saw(memorized_model, capsys):
    record = run_eval("--suite", "latency-1k", "--model", str(memorized_model), "--limit", "2",
                      "--threads", "1")
    assert record["context_tokens_requested"] == 1000 and record["window"] == 256
    assert 0 < record["context_tokens_mean"] < 256
    assert "window cut the context" in capsys.readouterr().out
