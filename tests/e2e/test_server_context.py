"""Cross-file context through the real server (issue 23 part B): two open files, and the
request for one carries a window of the other, as the status command shows it (the same shape
as `maskfill-lsp --explain-context`); the memorized model answers the request for real."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from lsprotocol import types

from tests.e2e.server_session import (
    VSCODE,
    inline,
    open_document,
    replace,
    start,
    status,
    stop,
    wait_ready,
)

pytestmark = pytest.mark.asyncio

OTHER = ("def total(items):\n    result = 0\n    for item in items:\n        result += item\n"
         "    return result\n")
CURRENT = "def summary(items):\n    result = total(items)\n    return "


async def test_a_request_carries_the_other_open_files_window(memorized_model):
    client, _ = await start(memorized_model, VSCODE, settings={"extraContextTokens": 64})
    try:
        assert (await wait_ready(client))["loadState"] == "ready"
        root = Path.cwd() / "virtual-workspace"  # open documents only: nothing read from disk
        other, current = (root / "other.py").as_uri(), (root / "main.py").as_uri()
        open_document(client, other, OTHER)
        open_document(client, current, CURRENT)
        before = await status(client)
        await inline(client, current, 2, len("    return "), invoked=True)
        after = await status(client)
        assert after["modelRuns"] == before["modelRuns"] + 1
        context = after["context"]
        assert after["extraContextTokens"] == 64
        assert set(context) == {"snippets", "tokens", "ms"}
        [snippet] = context["snippets"]
        assert snippet["path"] == "virtual-workspace/other.py"
        assert snippet["why"].startswith("window:")
        assert snippet["text"] == OTHER.rstrip("\n")
        assert (snippet["start_line"], snippet["end_line"]) == (1, 6)  # 60-line window: to the end
        assert 0 < context["tokens"] <= 64

        # Closed, the file is gone from the next request's context.
        client.text_document_did_close(types.DidCloseTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri=other)))
        await inline(client, current, 2, len("    return "), invoked=True)
        assert (await status(client))["context"]["snippets"] == []

        # The default budget for a model with a window under 1024 tokens is 0: no context.
        open_document(client, other, OTHER)
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"extraContextTokens": None}))
        await inline(client, current, 2, len("    return "), invoked=True)
        final = await status(client)
        assert final["extraContextTokens"] == 0 and final["context"]["snippets"] == []
    finally:
        await stop(client)


async def until_encoded(client, deadline: float, encoded=None) -> None:
    """Wait until the engine has encoded a pre-warm (its idle queue runs it): `encoded` asks
    another process's engine; without it, the in-process engine's count in the status."""
    loop = asyncio.get_running_loop()
    while not (encoded() if encoded is not None
               else ((await status(client))["prewarmsEncoded"] or 0) >= 1):
        assert loop.time() < deadline, "the engine did not encode the pre-warm"
        await asyncio.sleep(0.1)


async def _first_request_after_an_open(memorized_model, idle_s: float, settings=None,
                                       encoded=None) -> dict:
    """The status after: a request in main.py with no other file open (no block), then
    other.py opened and the user idle for `idle_s`, then one character typed and the next
    request: the first to carry the new block, run by the model. `encoded`: a callable that
    says whether the engine has encoded the pre-warm (another process's engine); without it,
    the in-process engine's count in the status."""
    client, _ = await start(memorized_model, VSCODE,
                            settings={"extraContextTokens": 64, **(settings or {})})
    try:
        assert (await wait_ready(client))["loadState"] == "ready"
        root = Path.cwd() / "virtual-workspace"
        other, current = (root / "other.py").as_uri(), (root / "main.py").as_uri()
        open_document(client, current, CURRENT)
        await inline(client, current, 2, len("    return "), invoked=True)
        assert (await status(client))["context"]["snippets"] == []
        open_document(client, other, OTHER)
        await asyncio.sleep(idle_s)
        if idle_s:  # the engine encodes the new block on its idle queue: wait for the count
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while (await status(client))["prewarms"] < 1:
                assert loop.time() < deadline, "no pre-warm"
                await asyncio.sleep(0.1)
            await until_encoded(client, deadline, encoded)
        # "z" continues no suggestion: the request is not answered by typing through one
        replace(client, current, 2, (2, len("    return ")), (2, len("    return ")), "z")
        runs = (await status(client))["modelRuns"]
        await inline(client, current, 2, len("    return z"), invoked=True)
        after = await status(client)
        assert after["modelRuns"] == runs + 1
        [snippet] = after["context"]["snippets"]
        assert snippet["path"] == "virtual-workspace/other.py"
        return after
    finally:
        await stop(client)


async def test_a_block_changed_while_idle_is_prewarmed_so_the_next_request_reuses_it(
        memorized_model):
    """An open while the user idles changes the block; the server re-gathers it at the last
    cursor and the engine pre-warms it, so the first request carrying it starts warm. Typed
    at once instead (no idle moment), the same request encodes the new block cold."""
    warm = await _first_request_after_an_open(memorized_model, idle_s=1.0)
    assert warm["prewarms"] == 1
    assert warm["lastReusedContextTokens"] > 0, warm
    cold = await _first_request_after_an_open(memorized_model, idle_s=0.0)
    assert cold["prewarms"] == 0
    assert cold["lastReusedContextTokens"] < warm["lastReusedContextTokens"], (cold, warm)


async def test_a_block_the_idle_rule_changes_is_prewarmed_during_the_pause(memorized_model):
    """Another open file edited, then the user idles past the block's idle rule: the server
    re-gathers the block during the pause and the engine pre-warms it, so the next keystroke's
    request carries the changed block and starts warm (before, that request re-gathered the
    block itself and encoded it cold: the replay's reuse with open files fell for it)."""
    client, _ = await start(memorized_model, VSCODE, settings={"extraContextTokens": 64})
    try:
        assert (await wait_ready(client))["loadState"] == "ready"
        root = Path.cwd() / "virtual-workspace"
        other, current = (root / "other.py").as_uri(), (root / "main.py").as_uri()
        open_document(client, other, OTHER)
        open_document(client, current, CURRENT)
        await inline(client, current, 2, len("    return "), invoked=True)
        first = await status(client)
        assert first["context"]["snippets"][0]["text"] == OTHER.rstrip("\n")
        # Edited, the other file's window differs; no open/close/save: only the idle rule
        # re-gathers the block.
        replace(client, other, 2, (4, 0), (4, 0), "    count = len(items)\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (await status(client))["prewarms"] < 1:
            assert loop.time() < deadline, "no pre-warm during the pause"
            await asyncio.sleep(0.1)
        await until_encoded(client, deadline)
        replace(client, current, 2, (2, len("    return ")), (2, len("    return ")), "z")
        runs = (await status(client))["modelRuns"]
        await inline(client, current, 2, len("    return z"), invoked=True)
        after = await status(client)
        assert after["modelRuns"] == runs + 1
        assert after["prewarms"] == 1
        assert any("count = len(items)" in s["text"] for s in after["context"]["snippets"])
        assert after["lastReusedContextTokens"] > 0, after
    finally:
        await stop(client)
