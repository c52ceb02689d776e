"""`python -m lsp_server.context.bench`: how long gathering takes with 20 open files of 2k
lines (the issue's target: p50 <= 5 ms, p99 <= 20 ms). Prints a table, then one JSON line.

The files are the largest modules of this Python's standard library (real code, on every
machine), cut to 2,000 lines, opened as a workspace in a temporary folder. Three figures:
- gather: a full gathering at a cursor (what a block change costs), at spread cursors;
- after_edit: the same, the current document edited just before (a new version each time);
- keystroke: the per-request cost with the stability rule while typing (mostly reuse).
Wall-clock figures on a busy machine include waits for a core; the CPU-time figures do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from pygls.uris import from_fs_path

from lsp_server.context import ContextGatherer, StableContext
from lsp_server.context.gatherer import OpenFile

LINES = 2000



def _stdlib_files(count: int) -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    # Top-level modules first, then those of packages, until `count` are found.
    for path in [*sorted(lib.glob("*.py")), *sorted(lib.glob("*/*.py"))]:
        if "test" in path.parts[-2] or path.name.startswith("test"):
            continue
        try:
            lines = path.read_text(encoding="utf-8").count("\n")
        except (OSError, UnicodeDecodeError):
            continue
        if lines >= LINES:
            files.append(path)
    return files[:count]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--cursors", type=int, default=100)
    parser.add_argument("--budget", type=int, default=512, help="extra context tokens")
    args = parser.parse_args(argv)
    sources = _stdlib_files(args.files)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        docs = []
        for path in sources:
            text = "\n".join(path.read_text(encoding="utf-8").split("\n")[:LINES]) + "\n"
            target = root / f"{path.parent.name}_{path.name}" if path.parent != Path(
                sysconfig.get_paths()["stdlib"]) else root / path.name
            target.write_text(text, encoding="utf-8")
            docs.append(OpenFile(from_fs_path(str(target)), "python", 1, text))
        # No time budget here: the bench measures a whole gathering, not what fits in 20 ms.
        gatherer = ContextGatherer([root], lambda: docs, time_budget_ms=float("inf"))
        for doc in docs:
            gatherer.opened(doc.uri)
        current = docs[0]
        lines = current.source.split("\n")
        starts = [sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))]
        started = time.perf_counter()
        gatherer.gather(current.uri, current.source, starts[100], args.budget)
        first_ms = (time.perf_counter() - started) * 1000.0  # indexes every file once
        gather_ms, cpu_ms, sizes = [], [], []
        for k in range(args.cursors):
            line = 60 + k * (LINES - 120) // args.cursors
            cpu = time.thread_time()
            block = gatherer.gather(current.uri, current.source, starts[line], args.budget)
            cpu_ms.append((time.thread_time() - cpu) * 1000.0)
            gather_ms.append(block.ms)
            sizes.append(block.tokens)
        # A gathering after an edit: the current document is a new version each time (its
        # windows are updated where lines changed, its imports scanned again).
        edit_cpu_ms = []
        for k in range(args.cursors):
            line = 60 + k * (LINES - 120) // args.cursors
            at = starts[line]
            current.source = current.source[:at] + "y" + current.source[at:]
            current.version += 1
            cpu = time.thread_time()
            gatherer.gather(current.uri, current.source, at + 1, args.budget)
            edit_cpu_ms.append((time.thread_time() - cpu) * 1000.0)
            current.source = current.source[:at] + current.source[at + 1:]
            current.version += 1
        stable = StableContext(gatherer)
        key_ms = []
        offset = starts[1000]
        for _ in range(200):  # type 200 characters at one place, one request each
            current.source = current.source[:offset] + "x" + current.source[offset:]
            current.version += 1
            gatherer.edited(current.uri, 1000)
            stable.activity()
            offset += 1
            t0 = time.perf_counter()
            stable.current(current.uri, current.source, offset, args.budget)
            key_ms.append((time.perf_counter() - t0) * 1000.0)
    record = {
        "files": len(docs),
        "lines_per_file": LINES,
        "budget_tokens": args.budget,
        "first_gather_ms": round(first_ms, 2),
        "gather_p50_ms": round(statistics.median(gather_ms), 3),
        "gather_p99_ms": round(_percentile(gather_ms, 0.99), 3),
        # CPU time of the gathering thread: what the machine's other load does not inflate
        "gather_cpu_p50_ms": round(statistics.median(cpu_ms), 3),
        "gather_cpu_p99_ms": round(_percentile(cpu_ms, 0.99), 3),
        "after_edit_cpu_p50_ms": round(statistics.median(edit_cpu_ms), 3),
        "after_edit_cpu_p99_ms": round(_percentile(edit_cpu_ms, 0.99), 3),
        "keystroke_p50_ms": round(statistics.median(key_ms), 3),
        "keystroke_p99_ms": round(_percentile(key_ms, 0.99), 3),
        "tokens_mean": round(statistics.mean(sizes), 1),
        "regathers_while_typing": stable.gathers,
    }
    print(f"{'measure':<28}{'value':>12}")
    for key, value in record.items():
        print(f"{key:<28}{value:>12}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
