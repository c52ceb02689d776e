"""The local cross-file set (engine/eval/benchmarks/crossfile-py/, built by its build.py with
CrossCodeEval's recipe): loading, the context conditions, and CrossCodeEval's scores.

An item is a hole from a cross-file name's use to the end of its line, in a module of a package
the embedded model never saw. Conditions (what extra context the prompt carries):

- none     the file alone
- windows  windows of the package's other files, as open editor tabs (Jaccard-ranked)
- imports  signature lines of the imported names used near the cursor
- both     imports, then windows
- oracle   the file that defines the name, around the definition (the ceiling)

The engine never imports the server: each item's context per condition was gathered offline with
the server's gatherer (`python -m lsp_server.context.crossfile --write-contexts`, run by the set's
build.py) and stored in the set's contexts.jsonl.gz, at a few token budgets. It goes into
`CompletionRequest.extra`; the engine lays it out (engine/denoise/repo_context.py).
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.api import CompletionRequest, ContextChunk, EngineError

SET_DIR = Path(__file__).resolve().parent / "benchmarks" / "crossfile-py"
CONDITIONS = ("none", "windows", "imports", "both", "oracle")
CONTEXTS_FILE = "contexts.jsonl.gz"
CONTEXT_BUDGETS = (128, 512)  # extra-context tokens (the server's estimate) stored per item
MAX_TOKENS = 32  # span budget: a line
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Item:
    task_id: str
    package: str
    path: str
    line: int
    col: int
    offset: int
    reference: str
    name: str
    oracle: str
    oracle_line: int


@dataclass(frozen=True)
class CrossfileSet:
    items: list[Item]
    files: dict[str, dict[str, str]]  # package -> path -> text

    def hole(self, item: Item) -> tuple[str, str]:
        """(prefix, suffix) of the item's file around its hole."""
        text = self.files[item.package][item.path]
        end = item.offset + len(item.reference)
        assert text[item.offset : end] == item.reference, item.task_id
        return text[: item.offset], text[end:]


def load_set(folder: Path | None = None) -> CrossfileSet:
    folder = folder or SET_DIR
    with gzip.open(folder / "items.jsonl.gz", "rt", encoding="utf-8") as fh:
        items = [Item(**json.loads(line)) for line in fh if line.strip()]
    files: dict[str, dict[str, str]] = {}
    with gzip.open(folder / "repos.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            files.setdefault(row["package"], {})[row["path"]] = row["text"]
    return CrossfileSet(items, files)


# ----------------------------------------------------------------------------- scores


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    return first_line(prediction).strip() == reference.strip()


def edit_similarity(prediction: str, reference: str) -> float:
    """1 - Levenshtein distance / the longer length (CrossCodeEval's ES, as a fraction)."""
    a, b = first_line(prediction).strip(), reference.strip()
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def identifier_scores(prediction: str, reference: str) -> tuple[bool, float]:
    """(identifier exact match, identifier F1): the identifiers of the line, in order."""
    predicted = _IDENTIFIER.findall(first_line(prediction))
    wanted = _IDENTIFIER.findall(reference)
    if predicted == wanted:
        return True, 1.0
    common = sum(min(predicted.count(x), wanted.count(x)) for x in set(wanted))
    if not common:
        return False, 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return False, 2 * precision * recall / (precision + recall)


def summarize(predictions: Sequence[tuple[Item, str]]) -> dict:
    """EM, ES and identifier EM/F1 over (item, completion) pairs."""
    ems, ess, id_ems, id_f1s = [], [], [], []
    for item, text in predictions:
        ems.append(exact_match(text, item.reference))
        ess.append(edit_similarity(text, item.reference))
        id_em, id_f1 = identifier_scores(text, item.reference)
        id_ems.append(id_em)
        id_f1s.append(id_f1)
    n = len(predictions)
    return {
        "tasks": n,
        "exact_match": round(sum(ems) / n, 4) if n else None,
        "edit_similarity": round(statistics.mean(ess), 4) if n else None,
        "identifier_em": round(sum(id_ems) / n, 4) if n else None,
        "identifier_f1": round(statistics.mean(id_f1s), 4) if n else None,
    }


# ----------------------------------------------------------------------------- contexts


def load_contexts(folder: Path | None = None) -> dict[tuple[str, int], dict[str, tuple]]:
    """contexts.jsonl.gz: (task_id, budget) -> condition -> the chunks, as ContextChunk."""
    path = (folder or SET_DIR) / CONTEXTS_FILE
    if not path.is_file():
        raise EngineError(f"{path} is missing: build it with `python -m "
                          "lsp_server.context.crossfile --write-contexts`")
    out = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            out[row["task_id"], row["budget"]] = {
                condition: tuple(ContextChunk(p, t) for p, t in chunks)
                for condition, chunks in row["conditions"].items()}
    return out


def pick_budget(window: int, max_tokens: int, budgets: Sequence[int]) -> int:
    """The largest stored budget within the half of the context the engine gives the extra
    block (engine/engine.py `_context_ids`); the smallest when none is."""
    room = (window - max_tokens) // 2
    fitting = [b for b in budgets if b <= room]
    return max(fitting) if fitting else min(budgets)


def run(engine, data: CrossfileSet, items: Sequence[Item], condition: str,
        extra_for: Callable[[Item, str], Sequence[tuple[str, str] | ContextChunk]],
        max_tokens: int = MAX_TOKENS) -> tuple[dict, list[tuple[Item, str]]]:
    """Complete every item under `condition` (line stop, greedy) and score it. The context
    goes in the request's `extra` field; the engine lays it out (repository tokens when the
    tokenizer has them, else comment blocks) and cuts the file's own text to what is left."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r} ({', '.join(CONDITIONS)})")
    predictions = []
    for item in items:
        prefix, suffix = data.hole(item)
        extra = tuple(c if isinstance(c, ContextChunk) else ContextChunk(*c)
                      for c in (extra_for(item, condition) if condition != "none" else ()))
        result = engine.complete(CompletionRequest(prefix=prefix, suffix=suffix, extra=extra,
                                                   max_tokens=max_tokens, stop="line"))
        predictions.append((item, result.text))
    return summarize(predictions), predictions


def evaluate(ns, model: str) -> dict:
    """`python -m engine.eval --suite crossfile-py`: every condition (ns.conditions) over the
    set's items (ns.limit spread evenly), with the stored contexts, on `model` (a checkpoint
    folder); a table, then one JSON line with each condition's scores."""
    import time

    import torch

    from engine.engine import Engine

    data = load_set(ns.data_dir)
    contexts = load_contexts(ns.data_dir)
    budgets = sorted({budget for _, budget in contexts})
    conditions = ns.conditions.split(",") if getattr(ns, "conditions", None) else CONDITIONS
    for condition in conditions:
        if condition not in CONDITIONS:
            raise EngineError(f"unknown condition {condition!r} ({', '.join(CONDITIONS)})")
    items = data.items
    if ns.limit is not None and ns.limit < len(items):
        items = [items[i * len(items) // ns.limit] for i in range(ns.limit)]
    max_tokens = ns.max_tokens or MAX_TOKENS
    torch.set_num_threads(ns.threads)
    engine = Engine.load(model, device=ns.device, quant=ns.quant,
                         context_reuse=ns.context_reuse == "on")
    try:
        window = engine.info().max_context
        budget = ns.extra_tokens or pick_budget(window, max_tokens, budgets)
        if budget not in budgets:
            raise EngineError(f"no stored contexts for a {budget}-token budget "
                              f"(stored: {budgets})")
        results = {}
        for condition in conditions:
            started = time.perf_counter()
            summary, _ = run(engine, data, items, condition,
                             lambda item, c: contexts[item.task_id, budget][c], max_tokens)
            summary["seconds"] = round(time.perf_counter() - started, 1)
            results[condition] = summary
    finally:
        engine.close()
    print(f"suite crossfile-py · model {model} · window {window} · extra budget {budget} tokens")
    print(f"{'condition':<10}{'tasks':>6}{'EM':>8}{'ES':>8}{'id-EM':>8}{'id-F1':>8}")
    for condition, r in results.items():
        print(f"{condition:<10}{r['tasks']:>6}{r['exact_match']:>8.3f}"
              f"{r['edit_similarity']:>8.3f}{r['identifier_em']:>8.3f}{r['identifier_f1']:>8.3f}")
    record = {"suite": "crossfile-py", "model": model, "device": ns.device, "window": window,
              "extra_budget_tokens": budget, "max_tokens": max_tokens, "conditions": results}
    print(json.dumps(record), flush=True)
    return record
