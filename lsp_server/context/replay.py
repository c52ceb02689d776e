"""`python -m lsp_server.context.replay [--budget TOKENS] [--chars N]`: the keystroke replay
(engine/bench/keystroke_replay.py) without and with extra context from three other open files,
gathered by the server's StableContext at every request (issue 23: `reuse_hit_rate` with
three other files open within 0.05 of without).

The typed file is engine/denoise/fim.py; the other open files are three more engine modules. The
block takes `--budget` tokens of the model's window (the embedded model has no room by default, so
the budget is given explicitly here: the mechanics are what is measured). Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

from engine.api import ContextChunk
from lsp_server.context import ContextGatherer, OpenFile, StableContext

OTHERS = ("../engine.py", "prefill.py", "context_cache.py")  # beside engine/denoise/fim.py


def decorator(budget: int):
    """(decorate, stats): decorate(request, text, offset) adds the stable block."""
    from engine.bench import keystroke_replay

    folder = keystroke_replay.SOURCE.parent
    typed_uri = keystroke_replay.SOURCE.as_uri()
    paths = [(folder / name).resolve() for name in OTHERS]
    docs = {path.as_uri(): OpenFile(path.as_uri(), "python", 1, path.read_text(encoding="utf-8"))
            for path in paths}
    current = OpenFile(typed_uri, "python", 1, "")
    gatherer = ContextGatherer([folder.parents[1]], lambda: [*docs.values(), current])
    for uri in docs:
        gatherer.opened(uri)
    gatherer.opened(typed_uri)
    stable = StableContext(gatherer)
    stats = {"ms": [], "tokens": [], "blocks": set()}

    def decorate(request, text: str, offset: int):
        current.source = text
        started = time.perf_counter()
        block, _ = stable.current(typed_uri, text, offset, budget, None, "python")
        stats["ms"].append((time.perf_counter() - started) * 1000.0)
        stats["tokens"].append(block.tokens)
        stats["blocks"].add(block.snippets)
        extra = tuple(ContextChunk(s.path, s.text) for s in block.snippets)
        return dataclasses.replace(request, extra=extra)

    return decorate, stats, stable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--budget", type=int, default=128, help="extra-context tokens")
    parser.add_argument("--chars", type=int, default=150, help="characters typed")
    args = parser.parse_args(argv)
    import torch

    from engine.bench import keystroke_replay
    from engine.engine import Engine
    from engine.eval.harness import resolve_model

    torch.set_num_threads(1)
    record: dict = {}
    for label in ("without", "with"):
        engine = Engine.load(resolve_model(args.model), device="cpu")
        try:
            decorate, stats, stable = (None, None, None)
            if label == "with":
                decorate, stats, stable = decorator(args.budget)
            out = keystroke_replay.replay(engine, chars=args.chars, decorate=decorate)
        finally:
            engine.close()
        record[f"reuse_hit_rate_{label}"] = round(out["reuse_hit_rate"], 4)
        record[f"requests_{label}"] = out["replay_requests"]
        record[f"warm_ms_p50_{label}"] = out["replay_warm_ms_p50"]
        record[f"cold_ms_p50_{label}"] = out["replay_cold_ms_p50"]
        if stats is not None:
            record["gather_calls"] = len(stats["ms"])
            record["gatherings"] = stable.gathers
            record["block_changes"] = stable.changes
            record["distinct_blocks"] = len(stats["blocks"])
            record["block_tokens_p50"] = statistics.median(stats["tokens"])
            record["context_ms_p50"] = round(statistics.median(stats["ms"]), 3)
            record["context_ms_max"] = round(max(stats["ms"]), 3)
    record["reuse_delta"] = round(record["reuse_hit_rate_with"] - record["reuse_hit_rate_without"],
                                  4)
    for key, value in record.items():
        print(f"{key:<28}{value}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
