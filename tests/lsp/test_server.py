"""The server object in-process: settings reload the engine only when they should, CLI
overrides win, the editor-process check. The probe loader only records what was loaded."""

import asyncio
import logging
import os
import subprocess
import sys
import time

import msgspec
import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcServerNotInitialized

from engine.api import EngineInfo
from lsp_server import server as server_module
from lsp_server.documents import LspTextDocument, LspWorkspace, take_snapshot
from lsp_server.server import MessageLimiter, create_server, pid_alive, selection_at


class LoadProbe:
    def __init__(self, spec):
        self.spec = spec

    def info(self):
        return EngineInfo(
            model="probe",
            path="probe",
            family="dream",
            device=self.spec.device,
            dtype="float32",
            quant=self.spec.quant,
            weight_bytes=0,
            parameters=0,
            max_context=256,
            load_ms=0.0,
        )

    def complete(self, request, cancel=None):  # never called here
        raise AssertionError("no completion in these tests")

    def close(self):
        pass


def started_server(**kwargs):
    loads = []

    def loader(spec):
        loads.append(spec)
        return LoadProbe(spec)

    server = create_server(loader=loader, **kwargs)
    server.initialized = True
    server.start_loading()
    deadline = time.monotonic() + 5
    while not server.worker.ready:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return server, loads


def wait_loads(loads, count):
    deadline = time.monotonic() + 5
    while len(loads) < count:
        assert time.monotonic() < deadline, loads
        time.sleep(0.005)


def test_engine_settings_reload_the_model_and_others_do_not():
    server, loads = started_server()
    try:
        server.apply_settings({"maxTokens": 8, "stopMode": "line"})
        assert server.worker.state == "ready"  # load() would have set "loading" at once
        assert len(loads) == 1
        server.apply_settings({"device": "cuda", "quant": "int8"})
        wait_loads(loads, 2)
        assert (loads[-1].device, loads[-1].quant) == ("cuda", "int8")
        assert server.settings.max_tokens == 8  # earlier values kept
    finally:
        server.free()


def test_command_line_overrides_win_over_client_settings():
    server, loads = started_server(overrides={"model": "/models/m", "device": "cpu"})
    try:
        server.apply_settings({"model": "/other", "device": "cuda"})
        assert (server.settings.model, server.settings.device) == ("/models/m", "cpu")
        assert [spec.model for spec in loads] == ["/models/m"]
    finally:
        server.free()


def test_status_reports_the_loaded_model():
    server, _ = started_server()
    try:
        status = server.status()
        assert status["loadState"] == "ready" and status["device"] == "cpu"
        assert status["modelRuns"] == 0 and status["latencyMsP50"] is None
        assert status["jobsInFlight"] == 0 and status["peakJobsInFlight"] == 0
    finally:
        server.free()
        assert server.worker.state == "closed"


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)


def test_pid_alive_on_windows_queries_the_process_instead_of_signalling(monkeypatch):
    import lsp_server.server as server_module

    asked = []
    monkeypatch.setattr(server_module.sys, "platform", "win32")
    monkeypatch.setattr(server_module, "_windows_pid_alive", lambda pid: asked.append(pid) or False)
    monkeypatch.setattr(server_module.os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    assert not pid_alive(1234) and asked == [1234]
    assert not pid_alive(0)  # never a real editor process


async def test_parent_watch_survives_a_failing_check_and_exits_when_the_editor_dies(monkeypatch):
    import lsp_server.server as server_module

    answers = iter([RuntimeError("transient"), True, False])

    def flaky(pid):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(server_module, "pid_alive", flaky)
    server = create_server(loader=LoadProbe, parent_poll_s=0.001)
    gone = []
    server.parent_gone = lambda: gone.append(True)
    try:
        await asyncio.wait_for(server.watch_parent(4321), 5)
        assert gone == [True]
    finally:
        server.free()


def test_engine_error_messages_are_rate_limited():
    now = [0.0]
    limiter = MessageLimiter(60.0, clock=lambda: now[0])
    assert limiter.allow("maskfill: CUDA out of memory")
    assert not limiter.allow("maskfill: CUDA out of memory")  # the next keystroke's failure
    assert limiter.allow("maskfill: another error")
    now[0] = 61.0
    assert limiter.allow("maskfill: CUDA out of memory")


def opened(server, text, max_bytes=None):
    server.protocol._workspace = LspWorkspace(None)
    server.workspace.put_text_document(
        types.TextDocumentItem(uri="file:///t.py", language_id="python", version=1, text=text)
    )
    if max_bytes is not None:
        server.apply_settings({"maxDocumentBytes": max_bytes})


def test_requests_are_allowed_once_initialize_is_answered():
    server = create_server(loader=LoadProbe)
    opened(server, "x = 1\n")
    with pytest.raises(JsonRpcServerNotInitialized):
        server.snapshot("file:///t.py", types.Position(0, 0))
    server.initialized = True  # what the initialize handler sets before pygls replies
    assert server.snapshot("file:///t.py", types.Position(0, 5)).offset == 5
    server.free()


def test_documents_over_the_size_cap_get_no_snapshot(caplog):
    server = create_server(loader=LoadProbe)
    server.initialized = True
    opened(server, "x = 1\n" * 100, max_bytes=100)
    with caplog.at_level(logging.INFO, logger="lsp_server.server"):
        for _ in range(3):
            assert server.snapshot("file:///t.py", types.Position(0, 0)) is None
    assert sum("maxDocumentBytes" in r.getMessage() for r in caplog.records) == 1  # logged once
    server.apply_settings({"maxDocumentBytes": 1000})
    assert server.snapshot("file:///t.py", types.Position(1, 0)).offset == 6
    server.free()


def selection_context(start, end, text="print"):
    return types.InlineCompletionContext(
        trigger_kind=types.InlineCompletionTriggerKind.Automatic,
        selected_completion_info=types.SelectedCompletionInfo(
            range=types.Range(start=start, end=end), text=text
        ),
    )


def test_selection_is_used_only_when_it_ends_at_the_cursor_on_its_line():
    document = LspTextDocument("file:///t.py", "x = 1\ny = pri\n", version=1)
    snap = take_snapshot(document, types.Position(1, 7))
    good = selection_at(snap, selection_context(types.Position(1, 4), types.Position(1, 7)))
    assert (good.start, good.end, good.text) == (10, 13, "print")
    for start, end in [
        ((1, 4), (1, 6)),  # ends before the cursor
        ((1, 5), (1, 4)),  # reversed
        ((0, 4), (1, 7)),  # starts on another line
        ((0, 1), (0, 3)),  # another line altogether
        ((1, 8), (1, 7)),  # starts after the cursor
    ]:
        context = selection_context(types.Position(*start), types.Position(*end))
        assert selection_at(snap, context) is None, (start, end)
    assert selection_at(snap, None) is None


async def test_completion_fallback_honours_the_trigger_kind():
    server = create_server(loader=LoadProbe)
    server.initialized = True
    server.protocol.client_capabilities = types.ClientCapabilities()  # no inlineCompletion
    opened(server, "x = 1\n")
    asked = []

    async def recording_suggest(snapshot, document, *, invoked, selection=None):
        asked.append(invoked)
        return []

    server.service.suggest = recording_suggest
    handler = server.protocol.fm.features[types.TEXT_DOCUMENT_COMPLETION]
    for kind in (
        types.CompletionTriggerKind.Invoked,
        types.CompletionTriggerKind.TriggerCharacter,
        None,
    ):
        context = types.CompletionContext(trigger_kind=kind) if kind else None
        params = types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri="file:///t.py"),
            position=types.Position(0, 5),
            context=context,
        )
        await handler(params)  # pygls binds the server
    assert asked == [True, False, False]  # only a manual request gets several candidates
    server.free()


def test_handlers_are_module_functions_serving_each_server_its_own_state():
    """Issue 22: the handlers were closures inside create_server(); they are module-level
    functions now, put on every server made, each answering from its own server's state."""
    first, _ = started_server()
    second, _ = started_server()
    try:
        for server in (first, second):
            features = server.protocol.fm.features
            assert features[types.TEXT_DOCUMENT_INLINE_COMPLETION].func is (
                server_module.inline_completion)
            assert features[types.TEXT_DOCUMENT_DID_OPEN].func is server_module.did_open
        first.settings = msgspec.structs.replace(first.settings, enabled=False)
        status = server_module.STATUS_COMMAND
        assert first.protocol.fm.commands[status]()["enabled"] is False
        assert second.protocol.fm.commands[status]()["enabled"] is True
    finally:
        first.free()
        second.free()
