"""`python -m lsp_server.syntax.bench`: the syntax layer's costs on a 2,000-line file (the
standard library's enum.py, as design/context.md measured): full parse, re-parse after a
keystroke, the cursor's kind, and one candidate's check. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from lsp_server.syntax import DocumentTree, HoleCheck, kind_at

REPEATS = 30


def _ms(fn) -> list[float]:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def main() -> int:
    path = Path(sysconfig.get_paths()["stdlib"]) / "enum.py"
    text = "\n".join(path.read_text(encoding="utf-8").split("\n")[:2000]) + "\n"
    cursor = text.index("\n", len(text) // 2) + 1  # a line start mid-file
    figures: dict[str, list[float]] = {}
    figures["full_parse"] = _ms(lambda: DocumentTree("python", text).tree)
    doc = DocumentTree("python", text)
    assert doc.tree is not None

    def keystroke():
        doc.edit(cursor, cursor, "x")
        assert doc.tree is not None
        doc.edit(cursor, cursor + 1, "")
        assert doc.tree is not None

    figures["keystroke_reparse_x2"] = _ms(keystroke)
    figures["cursor_kind"] = _ms(lambda: kind_at(doc, cursor))
    before, after = text[:cursor], text[cursor:]
    figures["hole_check_build"] = _ms(lambda: HoleCheck("python", before, after, doc.tree))
    check = HoleCheck("python", before, after, doc.tree)
    indent = before.rsplit("\n", 2)[-2]
    indent = indent[: len(indent) - len(indent.lstrip())]
    good = f"{indent}value = compute(1, 2)\n"
    figures["check_good_candidate"] = _ms(lambda: check.accepts(good))
    figures["check_unclosed_paren"] = _ms(lambda: check.accepts(f"{indent}value = (1, 2\n"))
    figures["truncate_3_lines"] = _ms(
        lambda: check.truncate(f"{indent}a = 1\n{indent}b = (\n{indent}    c")
    )
    record = {name: round(statistics.median(values), 3) for name, values in figures.items()}
    record["lines"] = text.count("\n")
    print(f"{'operation (p50 of 30)':<28}{'ms':>10}")
    for name, value in record.items():
        print(f"{name:<28}{value:>10}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
