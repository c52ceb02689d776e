"""The local cross-file set (engine/eval/benchmarks/crossfile-py/, built by its build.py with
CrossCodeEval's recipe): loading, the context conditions, and CrossCodeEval's scores.

An item is a hole from a cross-file name's use to the end of its line, in a module of a package
the embedded model never saw. Conditions (what extra context the prompt carries):

- none     the file alone
- windows  windows of the package's other files, as open editor tabs (Jaccard-ranked)
- imports  signature lines of the imported names used near the cursor
- both     imports, then windows
- oracle   the file that defines the name, around the definition (the ceiling)

The engine never imports the server: the context of a condition comes from a callable the
caller passes (lsp_server.context.crossfile builds it with the server's gatherer). Until
CompletionRequest carries the extra context as its own field, `layout_prompt` places it as
comment-prefixed blocks before the file's text, the way Copilot lays it out.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.api import CompletionRequest

SET_DIR = Path(__file__).resolve().parent / "benchmarks" / "crossfile-py"
CONDITIONS = ("none", "windows", "imports", "both", "oracle")
CHARS_PER_TOKEN = 3  # as the server estimates tokens without a tokenizer
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


# ----------------------------------------------------------------------------- prompts


def comment_block(extra: Sequence[tuple[str, str]], comment: str = "#") -> str:
    """Copilot's layout of extra context: `# Compare this snippet from PATH:` and the lines,
    each commented, one block per chunk."""
    blocks = []
    for path, text in extra:
        lines = [f"{comment} Compare this snippet from {path}:"]
        lines += [f"{comment} {line}".rstrip() for line in text.split("\n")]
        blocks.append("\n".join(lines) + "\n")
    return "".join(blocks)


def layout_prompt(prefix: str, suffix: str, extra: Sequence[tuple[str, str]],
                  window_tokens: int, max_tokens: int) -> tuple[str, str]:
    """(prefix, suffix) with the extra context before the file's text, the file's prefix
    cut from its start (and the suffix from its end) so the extra block survives the
    engine's own cut to the window: 3:1 prefix:suffix of what the block leaves."""
    block = comment_block(extra)
    room = max(0, (window_tokens - max_tokens - 8) * CHARS_PER_TOKEN - len(block))
    suffix_room = room // 4
    suffix = suffix[:suffix_room]
    prefix_room = room - len(suffix)
    if len(prefix) > prefix_room:
        prefix = prefix[len(prefix) - prefix_room :]
        prefix = prefix[prefix.find("\n") + 1 :] if "\n" in prefix[:-1] else prefix
    return block + prefix, suffix


def run(engine, data: CrossfileSet, items: Sequence[Item], condition: str,
        extra_for: Callable[[Item, str], Sequence[tuple[str, str]]],
        max_tokens: int = 32) -> tuple[dict, list[tuple[Item, str]]]:
    """Complete every item under `condition` (line stop, greedy) and score it."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r} ({', '.join(CONDITIONS)})")
    window = engine.info().max_context
    predictions = []
    for item in items:
        prefix, suffix = data.hole(item)
        extra = extra_for(item, condition) if condition != "none" else ()
        prefix, suffix = layout_prompt(prefix, suffix, extra, window, max_tokens)
        result = engine.complete(CompletionRequest(prefix=prefix, suffix=suffix,
                                                   max_tokens=max_tokens, stop="line"))
        predictions.append((item, result.text))
    return summarize(predictions), predictions
