"""`python -m lsp_server.tools.demo_parse`: how many demo-hole completions leave the file
parsable, today and with the syntax layer (issue 23's first target: >= 80%; 38.9% before).

The real model (the embedded one unless --model) answers through the engine's Python API,
offline; nothing here goes through the server. Per hole (engine/eval/demo_holes.py):

- today: one request with the editor's `auto` stop, the engine's own pick (as
  `engine.eval.harness --suite demo-holes` scores it);
- today + cut: that same text after the SAFIM-style cut (HoleCheck.truncate);
- syntax: the stop the cursor's kind asks for (today's rule where it has none), every hole
  length's row asked for on its own, each row cut, then ranked (ended, parses, non-empty,
  confidence): what the wired server would show;
- syntax_strict: the same, showing only rows the cut made parse (JetBrains Full Line's rule):
  a hole where none parses shows nothing.
- server_off / server: the wired server's own path (CompletionService.prepare, the request it
  sends, _finish), with the `syntax` setting off and on (default settings otherwise: maxTokens
  32, the engine's `expr` stop, every row back and picked by syntax).

Scored as the eval scores it: among non-empty completions, the share whose completed file
passes `ast.parse`; also that count over all holes, and exact matches of the reference.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

from engine.api import CompletionRequest
from engine.engine import hole_lengths
from engine.eval.demo_holes import demo_holes
from lsp_server.syntax import (
    DocumentTree,
    HoleCheck,
    Row,
    apply_expression_stop,
    cut_rows,
    kind_at,
    stop_for_kind,
)

PIPELINES = ("today", "today_cut", "syntax", "syntax_strict", "server_off", "server")
EXPR_ENGINE_STOP = "expr"  # the engine's expression stop: short buckets, cut at the bracket


def through_server(engine, hole, syntax: bool) -> str:
    """The first suggestion the wired server would show at the hole (no protocol)."""
    from lsprotocol import types
    from pygls.workspace.position_codec import PositionCodec

    from lsp_server.completion import CompletionService
    from lsp_server.documents import LspTextDocument, take_snapshot
    from lsp_server.settings import Settings

    settings = Settings(syntax=syntax)
    service = CompletionService(None, lambda: settings)  # type: ignore[arg-type]
    codec = PositionCodec(types.PositionEncodingKind.Utf32)
    document = LspTextDocument("file:///demo.py", hole.prompt + hole.suffix, version=1,
                               language_id="python", position_codec=codec)
    if syntax:
        document.enable_syntax(settings.max_document_bytes)
    line = hole.prompt.count("\n")
    position = types.Position(line=line, character=len(hole.prompt.rsplit("\n", 1)[-1]))
    prepared = service.prepare(take_snapshot(document, position), invoked=False,
                               selection=None, document=document)
    result = engine.complete(service._request(prepared))
    texts = service._finish(result, prepared)
    return texts[0] if texts else ""


def parses(prompt: str, text: str, suffix: str) -> bool:
    try:
        ast.parse(prompt + text + suffix)
    except SyntaxError:
        return False
    return True


def _tally(rows: list[dict], key: str) -> dict:
    texts = [(r["hole"], r[key]) for r in rows]
    non_empty = [(h, t) for h, t in texts if t.strip()]
    good = sum(parses(h.prompt, t, h.suffix) for h, t in non_empty)
    exact = sum(t.strip() == h.reference.strip() for h, t in texts)
    return {
        "non_empty": len(non_empty),
        "parses": good,
        "parse_share": round(good / len(non_empty), 4) if non_empty else None,
        "parses_of_all": round(good / len(texts), 4),
        "exact": exact,
    }


def run(engine, max_tokens: int = 64) -> dict:
    rows = []
    started = time.perf_counter()
    for hole in demo_holes():
        today = engine.complete(CompletionRequest(prefix=hole.prompt, suffix=hole.suffix,
                                                  max_tokens=max_tokens, stop=hole.stop))
        check = HoleCheck("python", hole.prompt, hole.suffix)
        tree = DocumentTree("python", hole.prompt + hole.suffix)
        kind = kind_at(tree, len(hole.prompt))
        stop = stop_for_kind(kind) or hole.stop
        engine_stop = EXPR_ENGINE_STOP if stop == "expr" else stop
        probe = CompletionRequest(prefix=hole.prompt, suffix=hole.suffix,
                                  max_tokens=max_tokens, stop=engine_stop)
        candidates = []
        for length in hole_lengths(probe):
            result = engine.complete(CompletionRequest(
                prefix=hole.prompt, suffix=hole.suffix, max_tokens=max_tokens,
                stop=engine_stop, span_lengths=(length,)))
            for cand in result.candidates[:1]:
                text = cand.text
                if stop == "expr":
                    text = apply_expression_stop(text, "python", kind)
                candidates.append(Row(text, ended=cand.ended, confidence=cand.mean_confidence))
        ranked = cut_rows(check, candidates)
        best = ranked.rows[0].text if ranked.rows else ""
        parsing = [row for row in ranked.rows if row.parses]
        disagree = sum(1 for row in parsing
                       if not parses(hole.prompt, row.text, hole.suffix))
        rows.append({
            "server_off": through_server(engine, hole, False),
            "server": through_server(engine, hole, True),
            "hole": hole,
            "today": today.text,
            "today_cut": check.truncate(today.text).text if today.text.strip() else "",
            "syntax": best,
            "syntax_strict": parsing[0].text if parsing else "",
            "disagree": disagree,
            "kind": kind,
            "stop": stop,
            "dropped_empty": ranked.dropped_empty,
        })
    seconds = time.perf_counter() - started
    record = {name: _tally(rows, name) for name in PIPELINES}
    # Rows tree-sitter accepted that `ast.parse` refuses (the two parsers disagree).
    record["accepted_but_ast_refuses"] = sum(r["disagree"] for r in rows)
    record["holes"] = len(rows)
    record["seconds"] = round(seconds, 1)
    record["kinds"] = {k: sum(r["kind"] == k for r in rows) for k in sorted(
        {str(r["kind"]) for r in rows})}
    record["details"] = [
        {"task_id": r["hole"].task_id, "kind": r["kind"], "stop": r["stop"],
         "today": r["today"], "syntax": r["syntax"]}
        for r in rows
    ]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--details", action="store_true", help="print every hole's texts")
    args = parser.parse_args(argv)
    import torch

    from engine.engine import Engine
    from engine.eval.harness import resolve_model

    torch.set_num_threads(args.threads)
    engine = Engine.load(resolve_model(args.model), device="cpu")
    try:
        record = run(engine)
    finally:
        engine.close()
    if args.details:
        for d in record["details"]:
            print(f"{d['task_id']:<28} {d['kind']!s:<17} {d['stop']:<6} "
                  f"today={d['today']!r}  syntax={d['syntax']!r}")
    print(f"{'pipeline':<14}{'non-empty':>10}{'parses':>8}{'share':>8}{'of all':>8}{'exact':>7}")
    for name in PIPELINES:
        t = record[name]
        share = "-" if t["parse_share"] is None else f"{t['parse_share']:.1%}"
        print(f"{name:<14}{t['non_empty']:>10}{t['parses']:>8}{share:>8}"
              f"{t['parses_of_all']:>8.1%}{t['exact']:>7}")
    del record["details"]
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
