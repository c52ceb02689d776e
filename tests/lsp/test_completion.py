"""The pipeline's pure parts: what a request asks the model (prepare) and how a suggestion made
for an older document state is turned into a range valid now (_late). No model runs here;
the suggestion strings are inputs to the range conversion, not model output under test."""

from lsprotocol import types
from pygls.workspace import TextDocument
from pygls.workspace.position_codec import PositionCodec

from lsp_server.completion import CompletionService, Selection
from lsp_server.documents import take_snapshot
from lsp_server.settings import Settings

UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


class NoWorker:
    ready = False


def service(**settings) -> CompletionService:
    current = Settings(**settings)
    return CompletionService(NoWorker(), lambda: current)  # type: ignore[arg-type]


def snapshot(text: str, line: int, character: int, language: str = "python"):
    document = TextDocument(
        "file:///t.py", text, version=1, language_id=language, position_codec=UTF16
    )
    return document, take_snapshot(document, types.Position(line=line, character=character))


def test_prepare_splits_at_the_cursor_and_picks_the_stop_mode():
    _, snap = snapshot("def f(x):\n    return x + \n\nprint(f(1))\n", 1, 15)
    prepared = service().prepare(snap, invoked=False, selection=None)
    assert prepared.prefix == "def f(x):\n    return x + "
    assert prepared.suffix == "\n\nprint(f(1))\n"
    assert prepared.stop == "line" and prepared.candidates == 1
    assert service().prepare(snap, invoked=True, selection=None).candidates == 3


def test_prepare_applies_the_popup_selection():
    document, snap = snapshot("x = pri\n", 0, 7)
    selection = Selection(start=4, end=7, text="print", client_start=types.Position(0, 4))
    prepared = service().prepare(snap, invoked=False, selection=selection)
    assert prepared.prefix == "x = print"


def test_prepare_refuses_disabled_other_languages_and_binary():
    _, snap = snapshot("abc\n", 0, 3)
    assert service(enabled=False).prepare(snap, invoked=True, selection=None) is None
    assert service(languages=["rust"]).prepare(snap, invoked=True, selection=None) is None
    _, blob = snapshot("\x00\x01ELF" * 50, 0, 10)
    assert service().prepare(blob, invoked=True, selection=None) is None


def test_late_answer_replaces_what_the_user_typed_meanwhile():
    document, snap = snapshot("def f(x):\n    \n", 1, 4)
    pipeline = service()
    prepared = pipeline.prepare(snap, invoked=False, selection=None)
    document.apply_change(
        types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(1, 4), end=types.Position(1, 4)), text="re"
        )
    )
    late = pipeline._late(("return x",), snap, document, prepared, None)
    assert [(s.text, s.start, s.end) for s in late] == [
        ("return x", types.Position(1, 4), types.Position(1, 6))
    ]
    assert pipeline._late(("yield x",), snap, document, prepared, None) == []  # diverged


def test_late_answer_is_dropped_after_an_unrelated_edit():
    document, snap = snapshot("def f(x):\n    \n", 1, 4)
    pipeline = service()
    prepared = pipeline.prepare(snap, invoked=False, selection=None)
    document.apply_change(
        types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(0, 0), end=types.Position(0, 0)), text="#"
        )
    )
    assert pipeline._late(("return x",), snap, document, prepared, None) == []
