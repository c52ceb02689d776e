"""How far a warm request's first pass is from a cold one's: `python -m engine.eval.reuse_quality`.

    python -m engine.eval.reuse_quality [--model M] [--limit N] [--typed first|newline]

For each HumanEval single-line task (engine/eval/harness.py's loader, the same rows `make eval`
runs): the context one keystroke earlier is encoded and kept in a context cache, then the task's own
context is prefilled twice: from scratch (cold) and from that cache entry (warm). The figure is
the share of hole slots whose top-1 token agrees between the two first passes, over every row
the engine would run (the line buckets), and the share of requests whose slots all agree.

`--typed first` (default): the keystroke is the first character of the reference line (the
user started typing it); `newline`: it is the newline ending the prompt (Enter, then a request).
The engine's real code paths run (ShrinkingSource, the context cache, the packed pass), one
thread; nothing here is faked or sampled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from engine.api import CompletionRequest
from engine.denoise.context_cache import ContextCache
from engine.denoise.fim import build_infill_batch, lead_specials
from engine.denoise.kv_arena import Layout
from engine.denoise.passes import ShrinkingSource, UncachedSource, packed_logits
from engine.denoise.prefill import context_ids


def first_logits(engine, batch, plan, keep: bool, cache: ContextCache | None) -> torch.Tensor:
    """(rows, lmax, V) logits of the request's first pass, cold (plan None) or warm."""
    loaded = engine._loaded
    args, model = loaded.args, loaded.model
    layout = Layout.of(batch, args, static=False)
    source = ShrinkingSource(model, args, batch, layout, engine._banned_all, loaded.dtype, plan,
                             context_ids(batch), keep)
    if source.first is not None:
        logits = source.first
    else:
        masked = batch.hole_valid.clone()
        stale = torch.zeros_like(masked)
        logits = packed_logits(model, engine._banned_all, [source.query(masked, stale, None)])[0]
    if keep and cache is not None:
        entry = source.prefilled.entry or source.new_entry()
        cache.put(entry)
    return logits


def measure(engine, tasks, typed: str, max_changed: int, window: int | None = None) -> dict:
    loaded = engine._loaded
    args = loaded.args
    from engine.engine import hole_lengths

    request = CompletionRequest(prefix="", suffix="", max_tokens=32, stop="line")
    lengths = hole_lengths(request)
    budget = args.max_context - len(lead_specials(args)) - 1 - max(lengths)
    agree = slots = requests = all_agree = warm = 0
    sure_agree = sure = lead_agree = longest_agree = longest_slots = 0
    exact_cold = exact_warm = 0
    started = time.perf_counter()
    for task in tasks:
        if typed == "first":
            if not task.canonical:
                continue
            before, after = task.prompt, task.prompt + task.canonical[0]
        else:
            before, after = task.prompt[:-1], task.prompt
        cache = ContextCache(1 << 30, max_reuses=1, max_changed=max_changed)
        if window is not None:
            cache.window = window
        batches = []
        for prefix in (before, after):
            prefix_ids, suffix_ids = engine._context_ids(prefix, task.suffix, budget)
            batches.append(build_infill_batch(args, prefix_ids, suffix_ids, lengths,
                                              loaded.device))
        with torch.inference_mode():
            first_logits(engine, batches[0], None, keep=True, cache=cache)
            batch = batches[1]
            layout = Layout.of(batch, args, static=False)
            lead, tail = context_ids(batch)
            plan = cache.plan(lead, tail, len(lead_specials(args)), layout.lead, layout.lmax)
            cold = first_logits(engine, batch, None, keep=False, cache=None)
            if plan is None:  # nothing reusable: the engine would encode it cold
                continue
            hot = first_logits(engine, batch, plan, keep=False, cache=None)
            exact = UncachedSource(loaded.model, batch, layout, engine._banned_all).logits(
                None, None, None).argmax(-1)
        valid = batch.hole_valid
        same = (cold.argmax(-1) == hot.argmax(-1)) & valid
        agree += int(same.sum())
        slots += int(valid.sum())
        requests += 1
        warm += 1
        all_agree += bool(same.sum() == valid.sum())
        # The slots a threshold step commits at once (p >= 0.9), and each row's first slot.
        confident = (cold.softmax(-1).amax(-1) >= 0.9) & valid
        sure += int(confident.sum())
        sure_agree += int((same & confident).sum())
        lead_agree += int(same[:, 0].sum()) / same.shape[0]
        longest = batch.hole_lengths.index(layout.lmax)
        longest_agree += int(same[longest].sum())
        longest_slots += int(valid[longest].sum())
        exact_cold += int(((cold.argmax(-1) == exact) & valid).sum())
        exact_warm += int(((hot.argmax(-1) == exact) & valid).sum())
    return {"typed": typed, "requests": requests, "warm_requests": warm, "slots": slots,
            "first_pass_top1_agreement": agree / max(slots, 1),
            "requests_all_slots_agree": all_agree / max(requests, 1),
            "first_slot_agreement": lead_agree / max(requests, 1),
            "confident_slot_agreement": sure_agree / max(sure, 1), "confident_slots": sure,
            "longest_row_agreement": longest_agree / max(longest_slots, 1),
            "cold_vs_full_forward": exact_cold / max(slots, 1),
            "warm_vs_full_forward": exact_warm / max(slots, 1),
            "seconds": time.perf_counter() - started}


def measure_chain(engine, tasks, max_chars: int, max_changed: int) -> dict:
    """Type each task's reference line one character at a time, every keystroke warm from the
    one before (no refresh): first-pass agreement with a cold request by hops since the last
    full encode. This is what `max_reuses` bounds."""
    loaded = engine._loaded
    args = loaded.args
    from engine.engine import hole_lengths

    lengths = hole_lengths(CompletionRequest(prefix="", suffix="", max_tokens=32, stop="line"))
    budget = args.max_context - len(lead_specials(args)) - 1 - max(lengths)
    by_hops: dict[int, list[int]] = {}
    for task in tasks:
        if not task.canonical:
            continue
        cache = ContextCache(1 << 30, max_reuses=1 << 20, max_changed=max_changed)
        typed = task.canonical.rstrip("\n")[:max_chars]
        for j in range(len(typed) + 1):
            prefix_ids, suffix_ids = engine._context_ids(task.prompt + typed[:j], task.suffix,
                                                         budget)
            batch = build_infill_batch(args, prefix_ids, suffix_ids, lengths, loaded.device)
            layout = Layout.of(batch, args, static=False)
            lead, tail = context_ids(batch)
            with torch.inference_mode():
                plan = cache.plan(lead, tail, len(lead_specials(args)), layout.lead,
                                  layout.lmax)
                if plan is None:
                    cache.clear()
                    first_logits(engine, batch, None, keep=True, cache=cache)
                    continue
                cold = first_logits(engine, batch, None, keep=False, cache=None)
                cache.clear()
                hot = first_logits(engine, batch, plan, keep=True, cache=cache)
            hops = plan.entry.reuses + 1
            valid = batch.hole_valid
            same = (cold.argmax(-1) == hot.argmax(-1)) & valid
            tally = by_hops.setdefault(hops, [0, 0])
            tally[0] += int(same.sum())
            tally[1] += int(valid.sum())
    return {f"agreement_at_{h}_hops": a / n for h, (a, n) in sorted(by_hops.items())} | {
        "slots_per_hop": {h: n for h, (_, n) in sorted(by_hops.items())}}


def main(argv: list[str] | None = None) -> int:
    from engine.denoise.context_cache import DEFAULT_MAX_CHANGED
    from engine.engine import Engine
    from engine.eval.harness import load_tasks, resolve_model, spread

    p = argparse.ArgumentParser(prog="python -m engine.eval.reuse_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or HF id (default: embedded)")
    p.add_argument("--limit", type=int, default=None, help="N tasks spread over the suite")
    p.add_argument("--typed", choices=["first", "newline", "line"], default="first",
                   help="line: type the reference line a character at a time (hops)")
    p.add_argument("--max-chars", type=int, default=24, help="--typed line: characters typed")
    p.add_argument("--max-changed", type=int, default=DEFAULT_MAX_CHANGED)
    p.add_argument("--window", type=int, default=None, help="recomputed tokens by the edit")
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    tasks, _ = load_tasks("humaneval-single")
    tasks = spread(tasks, ns.limit)
    engine = Engine.load(resolve_model(ns.model), concurrent=False, context_reuse=False)
    try:
        if ns.typed == "line":
            result = measure_chain(engine, tasks, ns.max_chars, ns.max_changed)
        else:
            result = measure(engine, tasks, ns.typed, ns.max_changed, ns.window)
    finally:
        engine.close()
    for key, value in result.items():
        print(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
