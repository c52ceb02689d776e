"""End to end over stdio: lifecycle and configuration. Each test starts its own server process.

- requests before `initialize`, a broken checkpoint, shutdown/exit codes;
- requests held while the model loads, invalid settings, the completion fallback, toggle;
- the editor-process watch (the server exits when `processId` dies).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import client_capabilities

from tests.e2e.server_session import (
    TEST_SETTINGS,
    VSCODE,
    inline,
    open_document,
    start,
    status,
    stop,
    wait_ready,
)

EXIT_TIMEOUT_S = 60  # generous: the shared CPU may be busy; this is a liveness bound only


async def test_before_initialize_then_broken_checkpoint_then_clean_exit(tmp_path):
    client, _ = await start(tmp_path / "no-such-model", initialize=False)
    with pytest.raises(JsonRpcException) as raised:  # raw send: pytest-lsp would refuse it
        await asyncio.wrap_future(
            client.protocol.send_request(
                types.TEXT_DOCUMENT_INLINE_COMPLETION,
                types.InlineCompletionParams(
                    text_document=types.TextDocumentIdentifier(uri="file:///x.py"),
                    position=types.Position(line=0, character=0),
                    context=types.InlineCompletionContext(
                        trigger_kind=types.InlineCompletionTriggerKind.Invoked
                    ),
                ),
            )
        )
    assert raised.value.code == -32002  # ServerNotInitialized

    await client.initialize_session(
        types.InitializeParams(
            capabilities=client_capabilities("visual-studio-code"),
            initialization_options=TEST_SETTINGS,
        )
    )
    state = await wait_ready(client)
    assert state["loadState"] == "failed" and "no-such-model" in state["error"]
    assert any(m.type == types.MessageType.Error for m in client.messages)
    open_document(client, "file:///x.py", "def is_even(n):\n")
    assert await inline(client, "file:///x.py", 1, 0) == []  # no model: empty, still serving

    await client.shutdown_async(None)
    client.exit(None)
    assert await asyncio.wait_for(client._server.wait(), EXIT_TIMEOUT_S) == 0
    await client.stop()


async def test_loading_settings_fallback_toggle_and_exit_without_shutdown(
    memorized_model, tmp_path
):
    neovim_011 = "neovim@v0.11.0"  # no inlineCompletion: the server answers textDocument/completion
    client = None
    gate = tmp_path / "let-the-model-load"
    try:
        client, _ = await start(memorized_model, VSCODE, initialize=False, load_gate=gate)
        await client.initialize_session(
            types.InitializeParams(
                capabilities=client_capabilities(neovim_011),
                initialization_options={**TEST_SETTINGS, "maxTokens": "lots", "colour": "red"},
            )
        )
        uri = "file:///even.py"
        open_document(client, uri, "def is_even(n):\n")
        assert (await status(client))["loadState"] == "loading"  # held at the gate
        held = asyncio.ensure_future(inline(client, uri, 1, 0))  # waits for the model
        for _ in range(600):
            current = await status(client)
            if current["heldRequests"] == 1:
                break
            await asyncio.sleep(0.02)
        assert current["loadState"] == "loading" and current["heldRequests"] == 1
        assert not held.done()
        gate.touch()
        assert (await held)[0].insert_text == "    return n % 2 == 0"

        warnings = " ".join(m.message for m in client.messages)
        assert "`maxTokens`" in warnings and "`colour`" in warnings
        assert (await wait_ready(client))["loadState"] == "ready"
        kinds = [r.kind for reports in client.progress_reports.values() for r in reports]
        assert kinds[0] == "begin" and kinds[-1] == "end"  # $/progress around the load

        completion = await client.text_document_completion_async(
            types.CompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=1, character=0),
            )
        )
        assert len(completion.items) == 1  # no context: not a manual request
        assert completion.items[0].text_edit.new_text == "    return n % 2 == 0"

        client.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"maskfill": {"stopMode": 7}})
        )
        toggled = await client.workspace_execute_command_async(
            types.ExecuteCommandParams(command="maskfill.toggle")
        )
        assert toggled == {"enabled": False}
        assert "`stopMode`" in " ".join(m.message for m in client.messages)
        assert await inline(client, uri, 1, 0) == []  # disabled
        await client.workspace_execute_command_async(
            types.ExecuteCommandParams(command="maskfill.toggle")
        )
        assert await inline(client, uri, 1, 0)  # enabled again (cached: no model run)

        client.exit(None)  # exit without shutdown: exit code 1 (LSP spec)
        assert await asyncio.wait_for(client._server.wait(), EXIT_TIMEOUT_S) == 1
    finally:
        if client is not None:
            if client._server.returncode is None:  # a failed assertion: stop() would wait
                client._server.kill()
            await client.stop()


async def test_server_exits_when_the_editor_process_dies(tmp_path):
    editor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    client = None
    try:
        client, _ = await start(
            tmp_path / "no-model", process_id=editor.pid, extra_args=("--parent-poll-ms", "100")
        )
        await wait_ready(client)
        assert client._server.returncode is None  # alive while the editor lives
        editor.kill()
        editor.wait()
        code = await asyncio.wait_for(client._server.wait(), EXIT_TIMEOUT_S)
        assert code == 0
    finally:
        editor.kill()
        if client is not None:
            await client.stop()


async def test_shutdown_then_exit_frees_the_model_and_exits_zero(memorized_model, tmp_path):
    log_file = tmp_path / "server.log"
    client, _ = await start(memorized_model, extra_args=("-v", "--log-file", str(log_file)))
    assert (await wait_ready(client))["loadState"] == "ready"
    await stop(client)
    assert client._server.returncode == 0
    assert "model freed" in log_file.read_text(encoding="utf-8")
