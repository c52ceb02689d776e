"""Where a model answer's rows are cut (issue 23's server overhead): by the thread that answers
the job (the engine host's runner) right after the model, not on the event loop, which serves
the editor meanwhile; the texts shown are the cut's, whichever thread made it. The memorized
model answers; nothing here stands in for its output."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import pytest
from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from lsp_server import completion
from lsp_server.completion import CompletionService
from lsp_server.documents import LspTextDocument, take_snapshot
from lsp_server.engine_host import LoadSpec, LspEngineHost
from lsp_server.settings import Settings

UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_answer_reaches_its_waiter_unless_it_gave_up():
    done: Future = Future()
    completion._fulfil(done, lambda a, b: a * b, 6, 7)
    assert done.result(0) == 42
    failed: Future = Future()
    completion._fulfil(failed, lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(0)
    gave_up: Future = Future()
    assert gave_up.cancel()  # the request was cancelled: its answer is dropped, no error
    completion._fulfil(gave_up, lambda: 1)
    assert gave_up.cancelled()


def test_the_rows_are_cut_on_the_runner_and_shown_as_cut(memorized_model, monkeypatch):
    cuts = []
    original = CompletionService._cut

    def recording_cut(self, result, prepared, check=None):
        finished = original(self, result, prepared, check)
        cuts.append((threading.current_thread().name, result, prepared, finished))
        return finished

    monkeypatch.setattr(CompletionService, "_cut", recording_cut)
    worker = LspEngineHost()
    try:
        worker.load(LoadSpec(model=str(memorized_model), context_reuse=False))
        wait_until(lambda: worker.state in ("ready", "failed"), timeout=120)
        assert worker.ready, worker.error
        settings = Settings(debounce_min_ms=0, debounce_max_ms=0, cache_size=0)
        service = CompletionService(worker, lambda: settings)
        text = "def is_even(n):\n    return \n"
        document = LspTextDocument("file:///cut.py", text, version=1, language_id="python",
                                   position_codec=UTF16)
        document.enable_syntax(settings.max_document_bytes)
        snap = take_snapshot(document, types.Position(line=1, character=11))
        shown = asyncio.run(service.suggest(snap, document, invoked=False))
    finally:
        worker.close()
    [(thread, result, prepared, finished)] = cuts
    assert thread == "maskfill-job"  # the runner that ran the model, not the event loop
    assert prepared.syntax is not None and service.syntax_judged == 1  # counted on the loop
    assert [s.text for s in shown] == list(finished.texts)
    assert finished.texts == original(service, result, prepared).texts  # the same cut here
