"""Several editor windows, one model: three real `maskfill-lsp` processes in shared mode (as
editors start them, over stdio) load one engine, each completes the memorized body through
it, and the engine exits by itself once the last window is gone."""

from __future__ import annotations

import asyncio

import pytest
from lsprotocol import types

from engine.serve.client import EngineConnection
from tests.e2e.server_session import (
    NEOVIM,
    VSCODE,
    inline,
    open_document,
    start,
    status,
    stop,
    wait_ready,
)
from tests.fixtures.memorized import SNIPPETS
from tests.service.conftest import wait_gone

SHARED = {"engineMode": "shared", "engineIdleExitS": 2}


async def test_three_windows_share_one_engine_and_one_model(memorized_model, runtime_dir):
    clients = []
    try:
        for name in (NEOVIM, VSCODE, VSCODE):
            client, _ = await start(memorized_model, name, settings=SHARED)
            clients.append(client)
        states = await asyncio.gather(*(wait_ready(c) for c in clients))
        assert all(s["loadState"] == "ready" and s["engineMode"] == "shared" for s in states)

        prefix = "def is_even(n):\n"
        body = next(s for s in SNIPPETS if s.startswith(prefix))[len(prefix):].rstrip("\n")
        for n, client in enumerate(clients):
            uri = f"file:///w{n}/even.py"
            open_document(client, uri, prefix)
            items = await inline(client, uri, 1, 0, invoked=True)
            assert body in [item.insert_text for item in items]
            assert all(i.range.start == types.Position(line=1, character=0) for i in items)
            assert (await status(client))["modelRuns"] == 1

        sockets = list(runtime_dir.glob("*.sock"))
        assert len(sockets) == 1  # one engine for the model+device+quant
        probe = EngineConnection.unix(sockets[0], name="probe")
        engine = probe.status().stats
        probe.close()
        assert engine["modelLoads"] == 1
        assert sorted(engine["clients"]) == sorted(["probe", *(
            f"maskfill-lsp {c._server.pid}" for c in clients)])
        assert engine["residentBytes"]["weights"] == engine["info"]["weight_bytes"] > 0
    finally:
        for client in clients:
            await stop(client)
    assert wait_gone(engine["pid"], 60), "the engine did not exit after its last window"
    assert not sockets[0].exists()


@pytest.mark.parametrize("mode", ["inprocess", "auto"])
async def test_on_cpu_the_default_keeps_the_model_in_the_server(memorized_model, runtime_dir,
                                                                mode):
    client, _ = await start(memorized_model, VSCODE, settings={"engineMode": mode})
    try:
        ready = await wait_ready(client)
        assert ready["loadState"] == "ready" and ready["engineMode"] == "inprocess"
        assert not list(runtime_dir.glob("*.sock"))  # no engine process was started
    finally:
        await stop(client)
