"""The context gatherer on the completion path (issue 23 part B.2): a request carries the
stable block as `extra`, byte-identical between keystrokes; its tokens widen the window; the
default budget is 0 for a model whose window is under 1024 tokens."""

from __future__ import annotations

from pathlib import Path

from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from lsp_server.completion import CompletionService
from lsp_server.context import ContextGatherer, OpenFile, StableContext
from lsp_server.documents import LspTextDocument, take_snapshot
from lsp_server.settings import Settings

UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)
ROOT = Path("/virtual-workspace")
OTHER = OpenFile((ROOT / "other.py").as_uri(), "python", 1,
                 "def total(items):\n    result = 0\n    for item in items:\n"
                 "        result += item\n    return result\n")


class NoWorker:
    ready = False


def service(docs, **settings) -> CompletionService:
    current = Settings(**settings)
    s = CompletionService(NoWorker(), lambda: current)  # type: ignore[arg-type]
    s.context = StableContext(ContextGatherer([ROOT], lambda: docs))
    return s


def request_at(s: CompletionService, document: LspTextDocument, line: int, character: int):
    snap = take_snapshot(document, types.Position(line=line, character=character))
    prepared = s.prepare(snap, invoked=False, selection=None, document=document)
    return prepared, s._request(prepared)


def test_the_request_carries_the_stable_block_and_a_window_grown_by_it():
    text = "def summary(items):\n    result = total(items)\n    return re"
    document = LspTextDocument((ROOT / "main.py").as_uri(), text, version=1,
                               language_id="python", position_codec=UTF16)
    s = service([OTHER, document], extra_context_tokens=64)
    prepared, request = request_at(s, document, 2, len("    return re"))
    [chunk] = request.extra
    assert chunk.path == "other.py" and chunk.text == OTHER.source.rstrip("\n")
    assert request.max_context_tokens == 1024 + prepared.extra_tokens
    assert s.last_context.snippets[0].why.startswith("window:")
    # The next keystroke: the same bytes (the engine's K/V reuse matches from the start).
    document.apply_change(types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(2, 13), end=types.Position(2, 13)), text="s"))
    _, again = request_at(s, document, 2, len("    return res"))
    assert again.extra == request.extra and again.extra[0].text is request.extra[0].text
    assert prepared.cache_key != (*prepared.cache_key[:-1], ())  # the block is in the key


def test_no_block_without_a_budget_and_by_default_for_a_small_window():
    text = "def summary(items):\n    return "
    document = LspTextDocument((ROOT / "main.py").as_uri(), text, version=1,
                               language_id="python", position_codec=UTF16)
    for settings, window in (({}, None), ({}, 384), ({"extra_context_tokens": 0}, 8192)):
        s = service([OTHER, document], **settings)
        s.model_window = window
        _, request = request_at(s, document, 1, len("    return "))
        assert request.extra == () and request.max_context_tokens == 1024
        assert s.last_context.snippets == ()
    s = service([OTHER, document])
    s.model_window = 8192  # a 7B model's window: a quarter of contextTokens by default
    assert s.extra_budget(s._settings()) == 256
    _, request = request_at(s, document, 1, len("    return "))
    assert request.extra and request.extra[0].path == "other.py"
