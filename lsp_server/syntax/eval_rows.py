"""`python -m lsp_server.syntax.eval_rows --suite humaneval-single OUT_DIR`: a suite's tasks
asked as `engine.eval.harness` asks them, but with every row back (all_rows), then picked as the
wired
server picks (lsp_server/syntax/pick.py). Writes three dumps that `engine.eval.harness --suite SUITE
--completions FILE` scores:

- engine.jsonl: the engine's own pick (candidates[0]: what `make eval` scores);
- syntax.jsonl: the best row whose cut parses, else nothing (the server's rule);
- syntax_fallback.jsonl: the same, else the engine's pick.

Prints one JSON line with how many picks changed. Checks the issue's bar: the syntax pick never
lowers HumanEval single-line pass@1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.api import CompletionRequest
from engine.eval.harness import load_tasks, postprocess, spread
from lsp_server.syntax.pick import SyntaxView, pick
from lsp_server.syntax.rank import Row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="humaneval-single")
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    import torch

    from engine.engine import Engine
    from engine.eval.harness import resolve_model

    torch.set_num_threads(1)
    tasks, spec = load_tasks(args.suite)
    tasks = spread(tasks, args.limit)
    engine = Engine.load(resolve_model(args.model), device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    names = ("engine", "syntax", "syntax_fallback")
    files = {name: (args.out / f"{name}.jsonl").open("w", encoding="utf-8") for name in names}
    changed = emptied = no_opinion = 0
    try:
        for task in tasks:
            result = engine.complete(CompletionRequest(
                prefix=task.prompt, suffix=task.suffix, max_tokens=spec.max_tokens,
                stop=task.stop or spec.stop, all_rows=True))
            shaped = [postprocess(c.text, spec, task) for c in result.candidates]
            best = shaped[0] if shaped else postprocess(result.text, spec, task)
            newline = "\n" if best.endswith("\n") else ""
            rows = [Row(text.rstrip("\n"), c.ended, c.mean_confidence)
                    for text, c in zip(shaped, result.candidates, strict=True)]
            view = SyntaxView("python", None, None, task.prompt, task.suffix)
            picked = pick(view, rows) if rows else None
            if picked is None or not picked.opinion:
                no_opinion += 1
                strict = fallback = best
            else:
                strict = picked.texts[0] + newline if picked.texts else ""
                fallback = strict or best
            changed += strict != best
            emptied += not strict.strip() and bool(best.strip())
            for name, text in zip(names, (best, strict, fallback), strict=True):
                files[name].write(json.dumps({"task_id": task.task_id, "completion": text}) + "\n")
                files[name].flush()
    finally:
        for f in files.values():
            f.close()
        engine.close()
    print(json.dumps({"tasks": len(tasks), "changed": changed, "emptied": emptied,
                      "no_opinion": no_opinion}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
