"""The maskfill language server: registration, lifecycle and thin handlers.

Handlers snapshot, await, convert; the pipeline lives in completion.py, conversion in
protocol.py. torch is never imported here: the engine is imported by the worker thread while
the server already answers requests (with empty lists until the model is ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from typing import Any
from urllib.parse import unquote

import msgspec
from lsprotocol import types
from pygls.exceptions import JsonRpcServerNotInitialized
from pygls.lsp.server import LanguageServer
from pygls.workspace import TextDocument

from lsp_server.completion import CompletionService, Selection
from lsp_server.documents import take_snapshot
from lsp_server.protocol import client_has_inline_completion, completion_list, inline_items
from lsp_server.settings import SETTINGS_SECTION, Settings, parse_settings
from lsp_server.worker import EngineWorker, Loader, LoadSpec, load_engine

log = logging.getLogger(__name__)

SERVER_NAME = "maskfill-lsp"
SERVER_VERSION = "0.1.0"
STATUS_COMMAND = "maskfill.status"
TOGGLE_COMMAND = "maskfill.toggle"
STATUS_NOTIFICATION = "maskfill/didChangeStatus"  # busy/ready state, like Copilot's
_ENGINE_KEYS = ("model", "device", "quant", "fallback_device")


class MaskfillServer(LanguageServer):
    """State of one server process: settings, the engine worker, the completion pipeline."""

    def __init__(
        self,
        *,
        overrides: dict[str, Any] | None = None,
        loader: Loader = load_engine,
        parent_poll_s: float = 1.0,
    ):
        super().__init__(SERVER_NAME, SERVER_VERSION)
        self.overrides = overrides or {}  # CLI --model/--device/--quant win over the client
        self.settings = self._with_overrides(Settings())
        self.parent_poll_s = parent_poll_s
        self.worker = EngineWorker(loader, on_event=self._engine_event)
        self.service = CompletionService(self.worker, lambda: self.settings)
        self.initialized = False
        self.shutdown_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress_ids = itertools.count(1)
        self._progress_token: str | None = None
        self._progress_begun = False
        self._background: set[asyncio.Task] = set()

    # -- settings -----------------------------------------------------------------------

    def _with_overrides(self, settings: Settings) -> Settings:
        if not self.overrides:
            return settings
        return msgspec.structs.replace(settings, **self.overrides)

    def apply_settings(self, raw: Any) -> None:
        """Validate and apply client settings; reload the engine when model/device/quant change."""
        before = self.settings
        parsed, warnings = parse_settings(raw, base=before)
        self.settings = self._with_overrides(parsed)
        for warning in warnings:
            self.show(warning, types.MessageType.Warning)
        engine_changed = any(
            getattr(before, key) != getattr(self.settings, key) for key in _ENGINE_KEYS
        )
        self.service.settings_changed(reloaded=engine_changed)
        if engine_changed and self.initialized:
            self.start_loading()

    def start_loading(self) -> None:
        s = self.settings
        self.worker.load(
            LoadSpec(
                model=s.model, device=s.device, quant=s.quant, fallback_device=s.fallback_device
            )
        )
        self.notify_status()

    # -- messages to the client -----------------------------------------------------------

    def show(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        log.info("showMessage: %s", message)
        self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    def notify_status(self) -> None:
        self.protocol.notify(
            STATUS_NOTIFICATION,
            {
                "state": self.worker.state,
                "enabled": self.settings.enabled,
                "error": self.worker.error,
            },
        )

    def _engine_event(self, kind: str, payload: dict[str, Any]) -> None:
        """Called on the worker thread: hop onto the event loop before talking to the client."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_engine_event, kind, payload)

    def _on_engine_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "load-begin":
            self._progress_begin(
                f"Loading {payload['model'] or 'the embedded model'} on {payload['device']}"
            )
        elif kind == "load-end":
            info = payload["info"]
            self._progress_end(f"{info['family']} model ready on {info['device']}")
            if payload.get("fellBack"):
                self.show(
                    f"maskfill: running on the fallback device {payload['device']}",
                    types.MessageType.Warning,
                )
        elif kind == "load-failed":
            self._progress_end("model not loaded")
            self.show(payload["message"], types.MessageType.Error)
        elif kind == "engine-error":
            self.show(payload["message"], types.MessageType.Warning)
        self.notify_status()

    def _progress_begin(self, title: str) -> None:
        window = self.client_capabilities.window if self.client_capabilities else None
        if not (window and window.work_done_progress) or self._progress_token is not None:
            return
        token = f"maskfill-load-{next(self._progress_ids)}"
        self._progress_token = token

        def created(_result: Any) -> None:  # a token may be used only once the client has it
            if self._progress_token == token:
                self._progress_begun = True
                self.work_done_progress.begin(
                    token,
                    types.WorkDoneProgressBegin(title="maskfill", message=title, cancellable=False),
                )

        self.work_done_progress.create(token, callback=created)

    def _progress_end(self, message: str) -> None:
        if self._progress_token is not None and self._progress_begun:
            self.work_done_progress.end(
                self._progress_token, types.WorkDoneProgressEnd(message=message)
            )
        self._progress_token = None
        self._progress_begun = False

    # -- lifecycle ------------------------------------------------------------------------

    def spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def watch_parent(self, pid: int) -> None:
        """Exit when the editor's process dies (the LSP `processId`), freeing the model first."""
        while True:
            await asyncio.sleep(self.parent_poll_s)
            if not pid_alive(pid):
                log.warning("editor process %d is gone; exiting", pid)
                self.free()
                logging.shutdown()
                os._exit(0)  # stdin may never close when the editor was killed

    def free(self) -> None:
        """Free the model (engine.close on the worker thread)."""
        self.worker.close()

    def status(self) -> dict[str, Any]:
        info = self.worker.info
        s = self.settings
        return {
            "model": info.path if info else s.model,
            "family": info.family if info else None,
            "device": info.device if info else s.device,
            "dtype": info.dtype if info else None,
            "quant": info.quant if info else s.quant,
            "loadState": self.worker.state,
            "loadMs": info.load_ms if info else None,
            "error": self.worker.error,
            "enabled": s.enabled,
            "requests": self.service.requests,
            "cacheHits": self.service.cache.hits,
            "typedThroughHits": self.service.typed.hits,
            "superseded": self.service.latest.superseded,
            **self.worker.stats.snapshot(),
        }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def find_document(ls: MaskfillServer, uri: str) -> TextDocument | None:
    """An open document, or None: never read unopened files from disk."""
    documents = ls.workspace.text_documents
    return documents.get(uri) or documents.get(unquote(uri))


def _selection(
    document: TextDocument, context: types.InlineCompletionContext | None
) -> Selection | None:
    info = context.selected_completion_info if context else None
    if info is None or info.range.start.line != info.range.end.line:
        return None
    return Selection(
        start=document.offset_at_position(info.range.start),
        end=document.offset_at_position(info.range.end),
        text=info.text,
        client_start=info.range.start,
    )


def create_server(
    *,
    overrides: dict[str, Any] | None = None,
    loader: Loader = load_engine,
    parent_poll_s: float = 1.0,
) -> MaskfillServer:
    server = MaskfillServer(overrides=overrides, loader=loader, parent_poll_s=parent_poll_s)

    @server.feature(types.INITIALIZE)
    def initialize(ls: MaskfillServer, params: types.InitializeParams) -> None:
        ls._loop = asyncio.get_running_loop()
        ls.apply_settings(params.initialization_options)
        if params.process_id is not None and params.process_id != os.getpid():
            ls.spawn(ls.watch_parent(params.process_id))

    @server.feature(types.INITIALIZED)
    def initialized(ls: MaskfillServer, params: types.InitializedParams) -> None:
        ls.initialized = True
        ls.start_loading()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: MaskfillServer, params: types.DidChangeConfigurationParams):
        if isinstance(params.settings, dict) and params.settings:
            ls.apply_settings(params.settings)
            return
        workspace = ls.client_capabilities.workspace if ls.client_capabilities else None
        if workspace and workspace.configuration:  # pull model: ask, off the request path
            ls.spawn(_pull_configuration(ls))

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(
        ls: MaskfillServer, params: types.InlineCompletionParams
    ) -> types.InlineCompletionList:
        document = _document_or_raise(ls, params.text_document.uri)
        snapshot = take_snapshot(document, params.position) if document else None
        if document is None or snapshot is None:
            return types.InlineCompletionList(items=[])
        selection = _selection(document, params.context)
        invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        suggestions = await ls.service.suggest(
            snapshot, document, invoked=invoked, selection=selection
        )
        return types.InlineCompletionList(items=inline_items(suggestions))

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    async def completion(
        ls: MaskfillServer, params: types.CompletionParams
    ) -> types.CompletionList | None:
        if client_has_inline_completion(ls.client_capabilities):
            return None  # the client shows our inline items; no double suggestions
        document = _document_or_raise(ls, params.text_document.uri)
        snapshot = take_snapshot(document, params.position) if document else None
        if document is None or snapshot is None:
            return None
        suggestions = await ls.service.suggest(snapshot, document, invoked=False)
        return completion_list(suggestions, snapshot.line_before, snapshot.codec)

    @server.command(STATUS_COMMAND)
    def status(ls: MaskfillServer, *args: Any) -> dict[str, Any]:
        return ls.status()

    @server.command(TOGGLE_COMMAND)
    def toggle(ls: MaskfillServer, *args: Any) -> dict[str, Any]:
        ls.settings = msgspec.structs.replace(ls.settings, enabled=not ls.settings.enabled)
        ls.notify_status()
        return {"enabled": ls.settings.enabled}

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: MaskfillServer, *args: Any) -> None:
        ls.shutdown_requested = True
        ls.free()

    @server.feature(types.EXIT)
    def exit_(ls: MaskfillServer, *args: Any) -> None:
        ls.free()

    return server


def _document_or_raise(ls: MaskfillServer, uri: str) -> TextDocument | None:
    if not ls.initialized:
        raise JsonRpcServerNotInitialized("maskfill: the server is not initialized yet")
    return find_document(ls, uri)


async def _pull_configuration(ls: MaskfillServer) -> None:
    with contextlib.suppress(Exception):  # a client that cannot answer keeps the old settings
        values = await ls.workspace_configuration_async(
            types.ConfigurationParams(items=[types.ConfigurationItem(section=SETTINGS_SECTION)])
        )
        if values and isinstance(values[0], dict):
            ls.apply_settings(values[0])
