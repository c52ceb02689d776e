"""A minimal editor-side client for the demo and the benchmark: start `maskfill-lsp` over
stdio, initialize like a UTF-16 inline-completion client, read maskfill.status, close."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient


class ClientError(Exception):
    """A failure worth one line on stderr."""


def server_command(model: str | None = None, device: str | None = None) -> list[str]:
    """The `maskfill-lsp` console script beside this interpreter, on PATH, or `-m lsp_server`."""
    script = Path(sys.executable).parent / "maskfill-lsp"
    found = str(script) if script.exists() else shutil.which("maskfill-lsp")
    command = [found] if found else [sys.executable, "-m", "lsp_server"]
    if model:
        command += ["--model", model]
    if device:
        command += ["--device", device]
    return command


async def _drain(process: asyncio.subprocess.Process, verbose: bool) -> None:
    assert process.stderr is not None
    while line := await process.stderr.readline():  # always drained: a full pipe blocks it
        if verbose:
            sys.stderr.write(line.decode(errors="replace"))


class Session:
    """One server process and the client talking to it."""

    def __init__(self, client: LanguageClient, stderr_task: asyncio.Task, started: float):
        self.client = client
        self.messages: list[str] = []
        self._stderr_task = stderr_task
        self.started = started

    @classmethod
    async def start(
        cls, command: list[str], *, settings: dict[str, Any] | None = None, verbose: bool = False
    ) -> tuple[Session, types.InitializeResult]:
        client = LanguageClient("maskfill-client", "0.1.0")
        started = time.perf_counter()
        await client.start_io(*command)
        session = cls(client, asyncio.create_task(_drain(client._server, verbose)), started)
        client.feature(types.WINDOW_SHOW_MESSAGE)(
            lambda params: session.messages.append(params.message)
        )
        client.feature("maskfill/didChangeStatus")(lambda params: None)  # busy state: unused
        capabilities = types.ClientCapabilities(
            general=types.GeneralClientCapabilities(position_encodings=["utf-16"]),
            text_document=types.TextDocumentClientCapabilities(
                inline_completion=types.InlineCompletionClientCapabilities()
            ),
        )
        result = await client.initialize_async(
            types.InitializeParams(
                capabilities=capabilities, process_id=None, initialization_options=settings
            )
        )
        client.initialized(types.InitializedParams())
        return session, result

    async def status(self) -> dict[str, Any]:
        return await self.client.workspace_execute_command_async(
            types.ExecuteCommandParams(command="maskfill.status")
        )

    async def wait_loaded(self, timeout_s: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.status()
            if status["loadState"] == "ready":
                return status
            if status["loadState"] == "failed":
                raise ClientError(
                    status["error"] or "; ".join(self.messages) or "the model did not load"
                )
            if time.monotonic() > deadline:
                raise ClientError(f"the model did not load within {timeout_s:.0f} s")
            await asyncio.sleep(0.1)

    def open(self, uri: str, text: str, language_id: str = "python") -> None:
        self.client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=uri, language_id=language_id, version=1, text=text
                )
            )
        )

    async def close(self) -> None:
        """shutdown + exit; a server that does not go within 10 s is killed."""
        process = self.client._server
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.shutdown_async(None), timeout=10)
            self.client.exit(None)
        if process is not None:
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except asyncio.TimeoutError:
                process.kill()
        await self.client.stop()
        self._stderr_task.cancel()


def inline_params(
    uri: str, position: types.Position, *, invoked: bool
) -> types.InlineCompletionParams:
    kind = types.InlineCompletionTriggerKind
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=position,
        context=types.InlineCompletionContext(
            trigger_kind=kind.Invoked if invoked else kind.Automatic
        ),
    )
