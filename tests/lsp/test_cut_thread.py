"""Where a model answer's rows are cut (issue 23's server overhead): by the thread that answers
the job (the engine host's runner) right after the model, not on the event loop, which serves
the editor meanwhile; the texts shown are the cut's, whichever thread made it. The memorized
model answers; nothing here stands in for its output."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from lsp_server import completion
from lsp_server.completion import CompletionService
from lsp_server.documents import LspTextDocument, take_snapshot
from lsp_server.engine_host import LoadSpec, LspEngineHost
from lsp_server.postprocess import is_useless, postprocess
from lsp_server.settings import Settings
from lsp_server.syntax.pick import pick
from lsp_server.syntax.rank import Row
from tests.waiting import wait_until

UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


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


# The memorized body at the start of its line, asked for by hand (up to 3 candidates): rows
# that parse in the hole, so the texts shown are not empty.
BODY_HOLE = ("def is_even(n):\n", types.Position(line=1, character=0))
MEMORIZED_BODY = "    return n % 2 == 0"


def suggest_with_cuts(memorized_model, monkeypatch, timeout_s: float = 120):
    """Shown texts for BODY_HOLE through the memorized model, the service, and every cut
    made: (thread's name, the model's result, the request's Prepared, the Finished)."""
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
        text, position = BODY_HOLE
        document = LspTextDocument("file:///cut.py", text, version=1, language_id="python",
                                   position_codec=UTF16)
        document.enable_syntax(settings.max_document_bytes)
        snap = take_snapshot(document, position)
        # (a bound on a hang, not a timing: a check never built once held the runner for good)
        shown = asyncio.run(asyncio.wait_for(service.suggest(snap, document, invoked=True),
                                             timeout_s))
    finally:
        worker.close()
    return service, [s.text for s in shown], cuts


def rows_of(result, prepared) -> list[Row]:
    """The model's distinct post-processed rows, best first (as any cut starts)."""
    rows: list[Row] = []
    for candidate in result.candidates:
        text = postprocess(candidate.text, prepared.cursor, prepared.stop)
        if text is not None and text not in (row.text for row in rows):
            rows.append(Row(text, candidate.ended, candidate.mean_confidence))
    return rows


def test_the_rows_are_cut_on_the_runner_and_shown_as_cut(memorized_model, monkeypatch):
    service, shown, cuts = suggest_with_cuts(memorized_model, monkeypatch)
    [(thread, result, prepared, finished)] = cuts
    assert thread == "maskfill-job"  # the runner that ran the model, not the event loop
    assert prepared.syntax is not None and service.syntax_judged == 1  # counted on the loop
    assert MEMORIZED_BODY in shown
    # What the event loop's cut (5fcad21) shows for these rows: the pick, called here.
    picked = pick(prepared.syntax, rows_of(result, prepared), want=prepared.candidates,
                  shown=lambda text: not is_useless(text, prepared.cursor))
    expected = [t for t in picked.texts if not is_useless(t, prepared.cursor)]
    assert picked.opinion and shown == expected[: prepared.candidates]  # none lost or moved


class DroppingPool:
    """Takes a task and never runs it, like a pool shut down with the task still queued."""

    def submit(self, *args, **kwargs) -> Future:
        return Future()


def shut_pool() -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()  # its submit raises RuntimeError, as at interpreter exit
    return pool


@pytest.mark.parametrize("pool", [shut_pool, DroppingPool], ids=["refused", "never-run"])
def test_a_hole_check_never_built_costs_the_syntax_cut_not_the_completion(
        memorized_model, monkeypatch, caplog, pool):
    """The hole check's thread refuses it (or never runs it): the runner does not wait for it
    for good; the rows are shown as in a language without a grammar, and it is logged once."""
    monkeypatch.setattr(completion, "_SYNTAX_THREADS", pool())
    monkeypatch.setattr(completion, "SYNTAX_CHECK_WAIT_S", 0.2, raising=False)
    with caplog.at_level(logging.WARNING, logger=completion.__name__):
        service, shown, cuts = suggest_with_cuts(memorized_model, monkeypatch, timeout_s=60)
    [(thread, result, prepared, finished)] = cuts
    assert thread == "maskfill-job" and prepared.syntax is None  # the cut went without it
    uncut = [row.text for row in rows_of(result, prepared)]
    assert shown == uncut[: prepared.candidates] and MEMORIZED_BODY in shown
    assert service.syntax_judged == 0
    [record] = [r for r in caplog.records if r.name == completion.__name__]
    assert "syntax check failed" in record.getMessage()
