"""`python -m lsp_server.syntax.cut_completions --suite SUITE DUMP OUT`: apply the SAFIM-style
cut (HoleCheck.truncate) to the completions of an `engine.eval.harness --dump` file, writing a dump
that
`engine.eval.harness --suite SUITE --completions OUT` scores. Checks that the cut never lowers a
suite's score (issue 23: HumanEval single-line pass@1). Prints how many completions the cut changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.eval.harness import load_tasks, read_jsonl
from lsp_server.syntax import HoleCheck


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("dump", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    tasks = {task.task_id: task for task in load_tasks(args.suite)[0]}
    changed = unparsable = 0
    rows = read_jsonl(args.dump)
    with args.out.open("w", encoding="utf-8") as out:
        for row in rows:
            task = tasks[str(row["task_id"])]
            text = row["completion"]
            if text.strip():
                cut = HoleCheck("python", task.prompt, task.suffix).truncate(text)
                unparsable += cut.parses is False
                if cut.parses and cut.text != text:
                    changed += 1
                    # keep the suite's line ending: a single-line answer ends with "\n"
                    text = cut.text + ("\n" if text.endswith("\n") and not
                                       cut.text.endswith("\n") else "")
            out.write(json.dumps({**row, "completion": text}) + "\n")
    print(json.dumps({"completions": len(rows), "changed": changed,
                      "no_cut_parses": unparsable}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
