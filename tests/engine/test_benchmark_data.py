"""The FIM benchmarks ship with the package; --data-dir / $MASKFILL_BENCHMARK_DIR replace them."""

from __future__ import annotations

import ast
import gzip
from pathlib import Path

import pytest

from engine.eval import harness as fim_eval
from engine.eval.benchmark_data import (
    BENCHMARK_ENV,
    HUMANEVAL_SINGLE,
    SHIPPED_DIR,
    benchmark_dir,
    benchmark_file,
)
from engine.train.corpus import select_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(BENCHMARK_ENV, raising=False)


def test_the_shipped_suites_load_with_their_full_task_counts():
    assert benchmark_dir() == SHIPPED_DIR and SHIPPED_DIR.is_relative_to(ROOT / "engine")
    counts = {suite: len(fim_eval.load_tasks(suite)[0])
              for suite in ("humaneval-single", "humaneval-multi", "santacoder-py")}
    assert counts == {"humaneval-single": 1033, "humaneval-multi": 5815, "santacoder-py": 1043}
    for folder in ("human-eval-infilling", "santacoder-fim"):
        assert (SHIPPED_DIR / folder / "LICENSE").is_file()
        assert (SHIPPED_DIR / folder / "SOURCE").read_text().strip()


def _one_task_copy(folder: Path) -> Path:
    """A benchmark folder whose HumanEval single-line file holds only the first record."""
    with gzip.open(SHIPPED_DIR / HUMANEVAL_SINGLE, "rt", encoding="utf-8") as fh:
        first = fh.readline()
    target = folder / HUMANEVAL_SINGLE
    target.parent.mkdir(parents=True)
    with gzip.open(target, "wt", encoding="utf-8") as fh:
        fh.write(first)
    return folder


def test_data_dir_beats_the_environment_which_beats_the_shipped_copy(tmp_path, monkeypatch):
    env_dir = _one_task_copy(tmp_path / "env")
    monkeypatch.setenv(BENCHMARK_ENV, str(env_dir))
    assert benchmark_file(HUMANEVAL_SINGLE) == env_dir / HUMANEVAL_SINGLE
    assert len(fim_eval.load_tasks("humaneval-single")[0]) == 1
    flag_dir = _one_task_copy(tmp_path / "flag")
    ns = fim_eval.parse_args(["--data-dir", str(flag_dir)])
    assert ns.data_dir == flag_dir
    assert benchmark_file(HUMANEVAL_SINGLE, ns.data_dir) == flag_dir / HUMANEVAL_SINGLE


def test_a_missing_benchmark_file_is_a_one_line_error_naming_where_to_get_it(tmp_path, capsys):
    done = tmp_path / "done.jsonl"
    done.write_text("")
    code = fim_eval.main(["--suite", "santacoder-py", "--data-dir", str(tmp_path),
                          "--completions", str(done)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "santacoder-fim-task.jsonl.gz not found" in err and str(tmp_path) in err
    assert "huggingface.co/datasets/bigcode/santacoder-fim-task" in err and "--data-dir" in err


def test_corpus_selection_refuses_to_run_without_its_decontamination_data(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.py").write_text("x = 1\n")
    with pytest.raises(fim_eval.EngineError, match="HumanEval-SingleLineInfilling"):
        select_corpus(roots={"lib": tmp_path / "lib"}, benchmark_dir=tmp_path / "none",
                      workers=1)


SYSTEM_PREFIXES = ("/proc/", "/dev/", "/sys/", "/usr/", "/etc/", "/tmp/")
HTTP_ROUTES = ("/v1/",)  # the FIM API's URL paths, not files


def test_no_absolute_machine_path_in_the_shipped_python():
    found = []
    for folder in ("engine", "lsp_server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "sample" in path.relative_to(ROOT).parts:  # the demo's document, not code we run
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and node.value.startswith("/") and node.value.count("/") >= 2
                        and node.value.strip("/")  # "//" is a comment marker
                        and " " not in node.value
                        and not node.value.startswith(SYSTEM_PREFIXES + HTTP_ROUTES)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert found == []
