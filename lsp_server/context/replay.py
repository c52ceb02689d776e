"""`python -m lsp_server.context.replay [--deterministic] [--seed S] [--chars N] [--compare]`: the
keystroke replay (engine/bench/keystroke_replay.py) without and with extra context from three
other open files, gathered by the server's StableContext at every request (issue 23:
`reuse_hit_rate` with three other files open within 0.05 of without).

`--deterministic` replays on a virtual clock (the same figures every run; `make bench` reports
them): each request that reaches the engine runs to completion, and the StableContext's clock,
its idle rule and the idle pre-warm's timer run on the replay's virtual time. Without it, the
real-time replay: requests run beside the typing and the next keystroke cancels them, so the
figures move with the machine's load (the gatherer's 20 ms time budget too, on the wall clock).

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

from lsp_server.context import ContextGatherer, OpenFile, StableContext

OTHERS = ("../engine.py", "prefill.py", "context_cache.py")  # beside engine/denoise/fim.py


def decorator(budget: int, engine=None, clock=None):
    """(decorate, keyed, stats, stable): decorate(request, text, offset) adds the stable block;
    keyed(text, offset) is the server's didChange, called at every keystroke. `clock`: the
    replay's (engine/bench/keystroke_replay.py: RealTime by default, or VirtualTime), which the
    gatherer's and the block's idle rule read too. With `engine`, the server's idle pre-warm
    (lsp_server/server.py): each keystroke and each request restart the block's idle clock and
    re-arm one timer; once the idle rule would re-gather the block, the timer re-gathers it at
    the last request's cursor (unless a key was typed since, as refresh_context) and hands a
    changed block to `engine.prewarm`.

    The server's didChange also records the edit for the gatherer's recent-edits source; the
    replay does not: the server leaves out edits inside the request's own lines, which is where
    the replay types."""
    from engine.bench import keystroke_replay

    clock = clock or keystroke_replay.RealTime()
    folder = keystroke_replay.SOURCE.parent
    typed_uri = keystroke_replay.SOURCE.as_uri()
    paths = [(folder / name).resolve() for name in OTHERS]
    docs = {path.as_uri(): OpenFile(path.as_uri(), "python", 1, path.read_text(encoding="utf-8"))
            for path in paths}
    current = OpenFile(typed_uri, "python", 1, "")
    gatherer = ContextGatherer([folder.parents[1]], lambda: [*docs.values(), current],
                               clock=clock.now)
    for uri in docs:
        gatherer.opened(uri)
    gatherer.opened(typed_uri)
    stable = StableContext(gatherer)
    stats = {"ms": [], "tokens": [], "blocks": set(), "changed_at_request": 0, "prewarms": 0}
    lock = threading.Lock()  # the stable block is read by requests and the idle timer
    pending: list = []  # the idle pre-warm's timer (one at most)
    last_sent: list = []  # (request, text, offset) of the last request
    typed: list[str] = [""]  # the document as of the last keystroke

    def idle_refresh(request, text: str, offset: int) -> None:
        with lock:
            if stable.idle_in() > 0 or typed[0] != text:  # typed since: the next request gathers
                return
            block, changed = stable.current(typed_uri, text, offset, budget, None, "python")
        if changed and block.snippets:
            if engine.prewarm(dataclasses.replace(request, extra=block.chunks())):
                stats["prewarms"] += 1

    def arm() -> None:
        """(Re)start the pre-warm's wait, as the server's not_idle: it fires once the block's
        idle rule would re-gather it, counted from the latest keystroke or request."""
        for timer in pending:
            timer.cancel()
        pending.clear()
        if engine is None or not last_sent:
            return
        with lock:
            wait = stable.idle_in()
        pending.append(clock.after(wait + 0.01, lambda args=last_sent[-1]: idle_refresh(*args)))

    def keyed(text: str, offset: int) -> None:
        with lock:
            typed[0] = text
            stable.activity()
        arm()

    def decorate(request, text: str, offset: int):
        with lock:
            current.source = typed[0] = text
            started = time.perf_counter()
            block, changed = stable.current(typed_uri, text, offset, budget, None, "python")
            stats["ms"].append((time.perf_counter() - started) * 1000.0)
            stats["changed_at_request"] += changed
        stats["tokens"].append(block.tokens)
        stats["blocks"].add(block.snippets)
        request = dataclasses.replace(request, extra=block.chunks())
        last_sent[:] = [(request, text, offset)]
        arm()
        return request

    return decorate, keyed, stats, stable


LABELS = ("without", "with", "with_no_idle_prewarm")


def replay_once(label: str, *, model: str | None = None, budget: int = 128, chars: int = 150,
                seed: int = 7, deterministic: bool = False, log: list | None = None) -> dict:
    """One replay on a fresh engine: `label` "without" the block, "with" it (and the idle
    pre-warm, its clock restarted by every keystroke as in the server) or
    "with_no_idle_prewarm" (keystrokes do not restart the block's idle clock: a request after
    a pause re-gathers it); on the virtual clock when `deterministic`. The
    figures of engine/bench/keystroke_replay.replay, and the block's own under "block"."""
    from engine.bench import keystroke_replay
    from engine.engine import Engine
    from engine.eval.harness import resolve_model

    engine = Engine.load(resolve_model(model), device="cpu")
    try:
        clock = keystroke_replay.VirtualTime(engine) if deterministic else None
        decorate, keyed, stats, stable = (None, None, None, None)
        if label != "without":
            decorate, keyed, stats, stable = decorator(
                budget, engine if label == "with" else None, clock)
        out = keystroke_replay.replay(engine, chars=chars, decorate=decorate, seed=seed,
                                      clock=clock, log=log,
                                      keyed=keyed if label == "with" else None)
    finally:
        engine.close()
    if stats is not None:
        out["block"] = {
            "gather_calls": len(stats["ms"]), "gatherings": stable.gathers,
            "block_changes": stable.changes,
            "block_changes_at_request": stats["changed_at_request"],
            "prewarms": stats["prewarms"], "distinct_blocks": len(stats["blocks"]),
            "block_tokens_p50": statistics.median(stats["tokens"]),
            "context_ms_p50": round(statistics.median(stats["ms"]), 3),
            "context_ms_max": round(max(stats["ms"]), 3),
        }
    return out


def compare(labels, show_requests: bool = False, **kwargs) -> dict:
    """reuse_hit_rate and the replay's counts for each label, and with minus without;
    `show_requests`: each request's outcome on stderr too."""
    record: dict = {}
    for label in labels:
        log: list = []
        out = replay_once(label, log=log, **kwargs)
        if show_requests:
            for item in log:
                stats = item.stats
                print(f"{label:<22}{item.at:8.3f} s  reached {item.reached:d}  "
                      f"cancelled {item.cancelled:d}  reused {item.reused:4d} of "
                      f"{stats.prefix_tokens + stats.suffix_tokens if stats else 0:4d}  "
                      f"passes {stats.forward_passes if stats else 0:3d}", file=sys.stderr)
        record[f"reuse_hit_rate_{label}"] = round(out["reuse_hit_rate"], 4)
        record[f"reuse_hit_rate_sent_{label}"] = round(out["reuse_hit_rate_sent"], 4)
        record[f"reuse_token_share_{label}"] = round(out["reuse_token_share"], 4)
        record[f"requests_{label}"] = out["replay_requests"]
        record[f"reached_{label}"] = out["replay_reached"]
        record[f"cancelled_{label}"] = out["replay_cancelled"]
        record[f"warm_ms_p50_{label}"] = out["replay_warm_ms_p50"]
        record[f"cold_ms_p50_{label}"] = out["replay_cold_ms_p50"]
        suffix = "" if label == "with" else "_no_idle_prewarm"
        for key, value in out.get("block", {}).items():
            record[key + suffix] = value
    if "reuse_hit_rate_with" in record:
        record["reuse_delta"] = round(
            record["reuse_hit_rate_with"] - record["reuse_hit_rate_without"], 4)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--budget", type=int, default=128, help="extra-context tokens")
    parser.add_argument("--chars", type=int, default=150, help="characters typed")
    parser.add_argument("--seed", type=int, default=7, help="the keystroke gaps' seed")
    parser.add_argument("--deterministic", action="store_true",
                        help="on a virtual clock: each request that reaches the engine runs to "
                             "completion, the idle pre-warm at its virtual moment")
    parser.add_argument("--compare", action="store_true",
                        help="also replay with the block but without the idle pre-warm")
    parser.add_argument("--requests", action="store_true",
                        help="print each request's outcome (stderr)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    # "with_no_idle_prewarm": the block re-gathered at the first request after an idle
    # moment (no idle pre-warm; the server before issue 23's last part), for comparison.
    record = {"deterministic": args.deterministic, "seed": args.seed, "chars": args.chars}
    record.update(compare(LABELS[: 3 if args.compare else 2], show_requests=args.requests,
                          model=args.model,
                          budget=args.budget, chars=args.chars, seed=args.seed,
                          deterministic=args.deterministic))
    for key, value in record.items():
        print(f"{key:<44}{value}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
