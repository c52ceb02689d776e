"""Helpers for the pytest-lsp e2e tests: start `python -m lsp_server` over stdio with a real
checkpoint, talk to it like an editor, read its maskfill.status."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.protocol import default_converter
from pytest_lsp import LanguageClient, make_test_lsp_client

CAPABILITIES = Path(__file__).parent / "capabilities"
NEOVIM = "neovim_v0.12.0-dev"  # a real dump: positionEncodings utf-8 first, inlineCompletion
VSCODE = "vscode_like_utf16"  # VS Code 1.65 dump + inlineCompletion, UTF-16 only
# Generous: the shared CI CPU may be slow, and a deadline would make answers depend on load.
TEST_SETTINGS = {"timeoutMs": 120000}
# The real server, except that its model load waits until the file named by the first
# argument exists: a test can look at the server while it is loading, deterministically.
GATED_SERVER = """
import functools, pathlib, sys, time
import lsp_server.server as server
from lsp_server import engine_host
from lsp_server.__main__ import main
gate = pathlib.Path(sys.argv.pop(1))
def gated_load(spec):
    while not gate.exists():
        time.sleep(0.02)
    return engine_host.load_engine(spec)
server.create_server = functools.partial(server.create_server, loader=gated_load)
sys.exit(main())
"""


def capabilities(name: str) -> types.ClientCapabilities:
    data = json.loads((CAPABILITIES / f"{name}.json").read_text(encoding="utf-8"))
    return default_converter().structure(data["capabilities"], types.ClientCapabilities)


async def start(
    model: Path | None,
    client_name: str = VSCODE,
    *,
    settings: dict[str, Any] | None = None,
    process_id: int | None = None,
    initialize: bool = True,
    extra_args: tuple[str, ...] = (),
    load_gate: Path | None = None,
) -> tuple[LanguageClient, types.InitializeResult | None]:
    """Start the server; with `load_gate`, its model load waits until that file exists."""
    client = make_test_lsp_client()
    launcher = ["-m", "lsp_server"] if load_gate is None else ["-c", GATED_SERVER, str(load_gate)]
    args = [*launcher, *extra_args]
    if model is not None:
        args += ["--model", str(model)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    await client.start_io(sys.executable, *args, env=env)
    result = None
    if initialize:
        result = await client.initialize_session(
            types.InitializeParams(
                capabilities=capabilities(client_name),
                initialization_options={**TEST_SETTINGS, **(settings or {})},
                process_id=process_id,
                root_uri=Path.cwd().as_uri(),
            )
        )
    return client, result


async def status(client: LanguageClient) -> dict[str, Any]:
    return await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="maskfill.status")
    )


async def wait_ready(client: LanguageClient, timeout_s: float = 180.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        current = await status(client)
        if current["loadState"] in ("ready", "failed"):
            return current
        assert loop.time() < deadline, f"model not loaded: {current}"
        await asyncio.sleep(0.1)


def open_document(client: LanguageClient, uri: str, text: str, version: int = 1) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(
                uri=uri, language_id="python", version=version, text=text
            )
        )
    )


def replace(
    client: LanguageClient,
    uri: str,
    version: int,
    start: tuple[int, int],
    end: tuple[int, int],
    text: str,
) -> None:
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(
                        start=types.Position(line=start[0], character=start[1]),
                        end=types.Position(line=end[0], character=end[1]),
                    ),
                    text=text,
                )
            ],
        )
    )


def inline_params(
    uri: str, line: int, character: int, *, invoked: bool = True
) -> types.InlineCompletionParams:
    kind = (
        types.InlineCompletionTriggerKind.Invoked
        if invoked
        else (types.InlineCompletionTriggerKind.Automatic)
    )
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(trigger_kind=kind),
    )


async def inline(
    client: LanguageClient, uri: str, line: int, character: int, *, invoked: bool = True
) -> list[types.InlineCompletionItem]:
    result = await client.text_document_inline_completion_async(
        inline_params(uri, line, character, invoked=invoked)
    )
    if result is None:
        return []
    return list(result.items if isinstance(result, types.InlineCompletionList) else result)


async def stop(client: LanguageClient) -> None:
    try:
        await asyncio.wait_for(client.shutdown_session(), timeout=30)
    finally:
        await client.stop()
