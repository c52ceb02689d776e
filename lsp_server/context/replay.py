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
import threading
import time

from engine.api import ContextChunk
from lsp_server.context import ContextGatherer, OpenFile, StableContext

OTHERS = ("../engine.py", "prefill.py", "context_cache.py")  # beside engine/denoise/fim.py


def decorator(budget: int, engine=None):
    """(decorate, stats, stable): decorate(request, text, offset) adds the stable block.
    With `engine`, the server's idle pre-warm too (lsp_server/server.py): once the block's
    idle rule would re-gather it, it is re-gathered at the last request's cursor while the
    user still idles, and a changed block is handed to `engine.prewarm`; the next request
    cancels a pending one, as a keystroke does in the server."""
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
    stats = {"ms": [], "tokens": [], "blocks": set(), "changed_at_request": 0, "prewarms": 0}
    lock = threading.Lock()  # the stable block is read by requests and the idle timer
    pending: list[threading.Timer] = []

    def extra_of(block):
        return tuple(ContextChunk(s.path, s.text) for s in block.snippets)

    def idle_refresh(request, text: str, offset: int) -> None:
        with lock:
            if stable.idle_in() > 0:  # a request came in between
                return
            block, changed = stable.current(typed_uri, text, offset, budget, None, "python")
        if changed and block.snippets:
            if engine.prewarm(dataclasses.replace(request, extra=extra_of(block))):
                stats["prewarms"] += 1

    def decorate(request, text: str, offset: int):
        for timer in pending:
            timer.cancel()
        pending.clear()
        with lock:
            current.source = text
            started = time.perf_counter()
            block, changed = stable.current(typed_uri, text, offset, budget, None, "python")
            stats["ms"].append((time.perf_counter() - started) * 1000.0)
            stats["changed_at_request"] += changed
            wait = stable.idle_in()
        stats["tokens"].append(block.tokens)
        stats["blocks"].add(block.snippets)
        request = dataclasses.replace(request, extra=extra_of(block))
        if engine is not None:
            timer = threading.Timer(wait + 0.01, idle_refresh, args=(request, text, offset))
            timer.daemon = True
            pending.append(timer)
            timer.start()
        return request

    return decorate, stats, stable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--budget", type=int, default=128, help="extra-context tokens")
    parser.add_argument("--chars", type=int, default=150, help="characters typed")
    parser.add_argument("--compare", action="store_true",
                        help="also replay with the block but without the idle pre-warm")
    args = parser.parse_args(argv)
    import torch

    from engine.bench import keystroke_replay
    from engine.engine import Engine
    from engine.eval.harness import resolve_model

    torch.set_num_threads(1)
    record: dict = {}
    # "with_no_idle_prewarm": the block re-gathered at the first request after an idle
    # moment (no idle pre-warm; the server before issue 23's last part), for comparison.
    for label in ("without", "with", "with_no_idle_prewarm")[: 3 if args.compare else 2]:
        engine = Engine.load(resolve_model(args.model), device="cpu")
        try:
            decorate, stats, stable = (None, None, None)
            if label != "without":
                decorate, stats, stable = decorator(
                    args.budget, engine if label == "with" else None)
            out = keystroke_replay.replay(engine, chars=args.chars, decorate=decorate)
        finally:
            engine.close()
        record[f"reuse_hit_rate_{label}"] = round(out["reuse_hit_rate"], 4)
        record[f"requests_{label}"] = out["replay_requests"]
        record[f"cancelled_{label}"] = out["replay_cancelled"]
        record[f"warm_ms_p50_{label}"] = out["replay_warm_ms_p50"]
        record[f"cold_ms_p50_{label}"] = out["replay_cold_ms_p50"]
        if stats is not None:
            suffix = "" if label == "with" else "_no_idle_prewarm"
            record["gather_calls" + suffix] = len(stats["ms"])
            record["gatherings" + suffix] = stable.gathers
            record["block_changes" + suffix] = stable.changes
            record["block_changes_at_request" + suffix] = stats["changed_at_request"]
            record["prewarms" + suffix] = stats["prewarms"]
            record["distinct_blocks" + suffix] = len(stats["blocks"])
            record["block_tokens_p50" + suffix] = statistics.median(stats["tokens"])
            record["context_ms_p50" + suffix] = round(statistics.median(stats["ms"]), 3)
            record["context_ms_max" + suffix] = round(max(stats["ms"]), 3)
    record["reuse_delta"] = round(record["reuse_hit_rate_with"] - record["reuse_hit_rate_without"],
                                  4)
    for key, value in record.items():
        print(f"{key:<44}{value}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
