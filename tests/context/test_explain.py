"""`maskfill-lsp --explain-context`, run as the real command: the snippets it prints, the JSON
line last, clear errors for bad arguments, and no torch imported."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.context.test_gatherer import MAIN, SHAPES


def _run(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; sys.argv = ['maskfill-lsp', *sys.argv[1:]]; "
        "from lsp_server.__main__ import main; rc = main(); "
        "sys.exit(rc if 'torch' not in sys.modules else 99)"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_explain_context_prints_the_block_as_json_last(workspace):
    workspace.write("geometry/__init__.py", "")
    workspace.write("geometry/shapes.py", SHAPES)
    main = workspace.write("app/main.py", MAIN)
    done = _run("--explain-context", "--root", str(workspace.root), "--file", str(main),
                "--line", "6", "--col", "12", "--budget", "400")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().split("\n")
    record = json.loads(lines[-1])
    assert set(record) == {"snippets", "tokens", "ms"}
    whys = [s["why"] for s in record["snippets"]]
    assert "import:total_area" in whys and "import:Circle" in whys
    assert all(set(s) == {"path", "start_line", "end_line", "why", "text"}
               for s in record["snippets"])
    assert 0 < record["tokens"] <= 400
    assert lines[0].startswith("geometry/shapes.py:")  # a readable line per snippet first


def test_explain_context_budget_zero_sends_nothing(workspace):
    main = workspace.write("main.py", "import os\nos.getcwd()\n")
    done = _run("--explain-context", "--root", str(workspace.root), "--file", str(main),
                "--line", "2", "--col", "1", "--budget", "0")
    assert done.returncode == 0
    assert json.loads(done.stdout.strip().split("\n")[-1]) == {"snippets": [], "tokens": 0,
                                                                "ms": 0.0}


def test_explain_context_bad_arguments_are_one_clear_line(workspace):
    main = workspace.write("main.py", "x = 1\n")
    done = _run("--explain-context", "--root", str(workspace.root), "--file", str(main),
                "--line", "9", "--col", "1")
    assert done.returncode == 2 and "--line 9 is outside main.py" in done.stderr
    done = _run("--explain-context", "--root", str(workspace.root))
    assert done.returncode == 2 and "needs --file, --line, --col" in done.stderr
    done = _run("--explain-context", "--root", str(workspace.root / "nope"), "--file",
                str(main), "--line", "1", "--col", "1")
    assert done.returncode == 2 and "is not a folder" in done.stderr
