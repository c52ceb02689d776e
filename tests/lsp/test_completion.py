"""The pipeline's pure parts: what a request asks the model (prepare) and how a suggestion made
for an older document state is turned into a range valid now (_late). No model runs here;
the suggestion strings are inputs to the range conversion, not model output under test."""

import asyncio

from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from engine.api import Candidate, CompletionResult, CompletionStats
from lsp_server.completion import CompletionService, Selection
from lsp_server.documents import LspTextDocument, take_snapshot
from lsp_server.engine_host import Job
from lsp_server.settings import Settings

UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


class NoWorker:
    ready = False


def service(**settings) -> CompletionService:
    current = Settings(**settings)
    return CompletionService(NoWorker(), lambda: current)  # type: ignore[arg-type]


def snapshot(text: str, line: int, character: int, language: str = "python"):
    document = LspTextDocument(
        "file:///t.py", text, version=1, language_id=language, position_codec=UTF16
    )
    return document, take_snapshot(document, types.Position(line=line, character=character))


def test_prepare_splits_at_the_cursor_and_picks_the_stop_mode():
    _, snap = snapshot("def f(x):\n    return x + \n\nprint(f(1))\n", 1, 15)
    prepared = service().prepare(snap, invoked=False, selection=None)
    assert prepared.prefix == "def f(x):\n    return x + "
    assert prepared.suffix == "\n\nprint(f(1))\n"
    assert prepared.stop == "line" and prepared.candidates == 1
    assert prepared.cursor.previous_lines == ["def f(x):"]  # for the copy-of-above rule
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


async def test_typed_through_gives_automatic_requests_one_suggestion_and_manual_ones_all():
    pipeline = service()
    before = "def add(a, b):\n    return "
    remembered = ("a + b", "a - b", "b + a")
    document, snap = snapshot(before + "\n", 1, 11)
    pipeline.typed.remember(snap.uri, snap.text, snap.offset, remembered)
    _, typed = snapshot(before + "a \n", 1, 13)
    automatic = await pipeline.suggest(typed, document, invoked=False)
    assert [s.text for s in automatic] == ["+ b"]
    manual = await pipeline.suggest(typed, document, invoked=True)
    assert [s.text for s in manual] == ["+ b", "- b"]


class OneJobWorker:
    """Hands out one job and lets the test decide when (and with what) it finishes; the
    result is a fixed string because only its fate (kept or dropped) is under test."""

    ready = True

    def __init__(self):
        self.job = None

    def submit(self, key, request, reply=None):
        self.job = Job(key=key, request=request, reply=reply)
        return self.job


def finished(text: str) -> CompletionResult:
    return CompletionResult(
        text=text,
        candidates=[Candidate(text=text, mean_confidence=1.0, span_length=4, ended=True)],
        stats=CompletionStats(),
    )


async def test_an_answer_made_under_old_settings_is_dropped_and_not_cached():
    worker = OneJobWorker()
    current = [Settings(debounce_min_ms=0, debounce_max_ms=0)]
    pipeline = CompletionService(worker, lambda: current[0])  # type: ignore[arg-type]
    document, snap = snapshot("def f(x):\n    \n", 1, 4)
    pending = asyncio.ensure_future(pipeline.suggest(snap, document, invoked=True))
    while worker.job is None:
        await asyncio.sleep(0)
    current[0] = Settings(max_tokens=8, debounce_min_ms=0, debounce_max_ms=0)
    pipeline.settings_changed(reloaded=False)
    worker.job.answer(finished("return x"))  # as the host answers a job
    assert await pending == []
    assert len(pipeline.cache) == 0


def test_the_cache_key_holds_every_setting_that_changes_the_answer():
    _, snap = snapshot("def f(x):\n    \n", 1, 4)
    keys = {
        service(**knob).prepare(snap, invoked=False, selection=None).cache_key
        for knob in (
            {},
            {"max_tokens": 8},
            {"timeout_ms": 50.0},
            {"model": "/other"},
            {"quant": "int8"},
            {"device": "cuda"},
        )
    }
    assert len(keys) == 6


async def submitted_request(text: str, line: int, character: int):
    """The request a fresh service (as after a server restart) sends the model."""
    worker = OneJobWorker()
    settings = Settings(debounce_min_ms=0, debounce_max_ms=0)
    pipeline = CompletionService(worker, lambda: settings)  # type: ignore[arg-type]
    document, snap = snapshot(text, line, character)
    pending = asyncio.ensure_future(pipeline.suggest(snap, document, invoked=True))
    while worker.job is None:
        await asyncio.sleep(0)
    worker.job.answer(finished("return x"))  # as the host answers a job
    await pending
    return worker.job.request


async def test_manual_candidates_are_seeded_by_their_context():
    """Extra candidates are sampled: the seed comes from the context, so the same code and
    cursor get the same candidates after a restart, and other code gets other draws."""
    first = await submitted_request("def f(x):\n    \n", 1, 4)
    again = await submitted_request("def f(x):\n    \n", 1, 4)
    other = await submitted_request("def g(y):\n    \n", 1, 4)
    assert first.num_candidates == 3 and first.temperature == 0.0
    assert first.seed is not None and 0 <= first.seed < 2**62
    assert again.seed == first.seed
    assert other.seed != first.seed
