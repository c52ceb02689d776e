"""The context conditions of the cross-file set (engine/eval/crossfile.py), built with the server's
own gatherer, and `python -m lsp_server.context.crossfile`: every condition scored with a
model through the engine's Python API (offline; the embedded model unless --model).

`python -m lsp_server.context.crossfile --write-contexts` (run by the set's build.py) stores
every item's chunks per condition and budget in the set's contexts.jsonl.gz, which is what
`python -m engine.eval --suite crossfile-py` reads: the engine never imports this package.

Each package is written to a temporary workspace folder once. For an item, the open documents
are its file (without the hole's text) and the package's other modules it imports, then the
rest of the package in path order, up to the gatherer's 20 files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

from pygls.uris import from_fs_path

from engine.eval.crossfile import (
    CONDITIONS,
    CONTEXT_BUDGETS,
    CONTEXTS_FILE,
    SET_DIR,
    CrossfileSet,
    Item,
    load_set,
    run,
)
from lsp_server.context.gatherer import ContextGatherer, OpenFile
from lsp_server.context.python_imports import parse_imports
from lsp_server.context.snippet import estimate_tokens
from lsp_server.context.windows import MAX_FILES

SOURCES_OF = {
    "windows": frozenset({"windows"}),
    "imports": frozenset({"imports"}),
    "both": frozenset({"imports", "windows"}),
}
ORACLE_LINES_ABOVE = 10



class ConditionContext:
    """extra_for(item, condition) -> [(path, text)] for engine.eval.crossfile.run."""

    def __init__(self, data: CrossfileSet, budget_tokens: int, folder: Path):
        self.data = data
        self.budget = budget_tokens
        self.folder = folder
        self._written: set[str] = set()

    def _root(self, package: str) -> Path:
        root = self.folder / package
        if package not in self._written:
            for path, text in self.data.files[package].items():
                target = root / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            self._written.add(package)
        return root

    def _open_documents(self, item: Item, root: Path, text: str) -> list[OpenFile]:
        files = self.data.files[item.package]
        imported = []
        for imp in parse_imports(text.split("\n")).values():
            module = imp.module.lstrip(".").replace(".", "/")
            for path in files:
                stem = path.removesuffix(".py").removesuffix("/__init__")
                if module and stem.endswith(module) and path not in imported:
                    imported.append(path)
        order = [*imported, *sorted(p for p in files if p not in imported)]
        docs = [OpenFile(from_fs_path(str(root / item.path)), "python", 1, text)]
        for path in order:
            if path != item.path and len(docs) < MAX_FILES:
                docs.append(OpenFile(from_fs_path(str(root / path)), "python", 1, files[path]))
        return docs

    def extra_for(self, item: Item, condition: str) -> list[tuple[str, str]]:
        return self.all_conditions(item, (condition,))[condition]

    def all_conditions(self, item: Item, conditions=CONDITIONS
                       ) -> dict[str, list[tuple[str, str]]]:
        """Every condition's chunks for `item`, with one gatherer (its index built once)."""
        out: dict[str, list[tuple[str, str]]] = {}
        gatherer = docs = None
        prefix, suffix = self.data.hole(item)
        text = prefix + suffix
        for condition in conditions:
            if condition == "none":
                out[condition] = []
                continue
            if condition == "oracle":
                out[condition] = self._oracle(item)
                continue
            if gatherer is None:
                docs = self._open_documents(item, self._root(item.package), text)
                gatherer = ContextGatherer([self._root(item.package)], lambda d=docs: d,
                                           time_budget_ms=1e9)
                for doc in reversed(docs):
                    gatherer.opened(doc.uri)
            block = gatherer.gather(docs[0].uri, text, len(prefix), self.budget,
                                    sources=SOURCES_OF[condition])
            out[condition] = [(s.path, s.text) for s in block.snippets]
        return out

    def _oracle(self, item: Item) -> list[tuple[str, str]]:
        lines = self.data.files[item.package][item.oracle].split("\n")
        first = max(0, item.oracle_line - 1 - ORACLE_LINES_ABOVE)
        kept: list[str] = []
        for line in lines[first:]:
            if estimate_tokens("\n".join([*kept, line])) + 8 > self.budget:
                break
            kept.append(line)
        return [(item.oracle, "\n".join(kept))] if kept else []


def write_contexts(data: CrossfileSet, budgets=CONTEXT_BUDGETS, out: Path | None = None) -> Path:
    """contexts.jsonl.gz: per item and budget, each condition's chunks ([path, text], highest
    priority first), as the server's gatherer picks them."""
    out = out or SET_DIR / CONTEXTS_FILE
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for budget in budgets:
            context = ConditionContext(data, budget, Path(folder))
            for item in data.items:
                chunks = context.all_conditions(item, CONDITIONS[1:])
                rows.append({"task_id": item.task_id, "budget": budget,
                             "conditions": {c: [list(x) for x in v] for c, v in chunks.items()}})
    # mtime 0 and sorted keys: the same set gives the same bytes
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-contexts", action="store_true",
                        help=f"store each item's context per condition in the set's "
                             f"{CONTEXTS_FILE} (budgets {CONTEXT_BUDGETS}) and exit")
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--limit", type=int, help="items, evenly spread over the set")
    parser.add_argument("--budget", type=int, default=256, help="extra-context tokens")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.write_contexts:
        data = load_set()
        started = time.perf_counter()
        out = write_contexts(data)
        print(f"{out}: {len(data.items)} items x {len(CONTEXT_BUDGETS)} budgets in "
              f"{time.perf_counter() - started:.1f} s")
        return 0
    import torch

    from engine.engine import Engine
    from engine.eval.harness import resolve_model

    torch.set_num_threads(args.threads)
    data = load_set()
    items = data.items
    if args.limit is not None and args.limit < len(items):
        items = [items[i * len(items) // args.limit] for i in range(args.limit)]
    engine = Engine.load(resolve_model(args.model), device="cpu")
    model = engine.info().model
    results = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            context = ConditionContext(data, args.budget, Path(folder))
            for condition in args.conditions.split(","):
                started = time.perf_counter()
                summary, _ = run(engine, data, items, condition, context.extra_for)
                summary["seconds"] = round(time.perf_counter() - started, 1)
                results[condition] = summary
    finally:
        engine.close()
    print(f"{'condition':<10}{'tasks':>6}{'EM':>8}{'ES':>8}{'id-EM':>8}{'id-F1':>8}")
    for condition, s in results.items():
        print(f"{condition:<10}{s['tasks']:>6}{s['exact_match']:>8.3f}{s['edit_similarity']:>8.3f}"
              f"{s['identifier_em']:>8.3f}{s['identifier_f1']:>8.3f}")
    print(json.dumps({"model": model, "budget_tokens": args.budget,
                      "conditions": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
