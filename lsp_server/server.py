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
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import msgspec
from lsprotocol import types
from pygls.exceptions import JsonRpcServerNotInitialized
from pygls.lsp.server import LanguageServer
from pygls.workspace import TextDocument

from lsp_server.completion import CompletionService, Selection
from lsp_server.documents import (
    LspWorkspace,
    Snapshot,
    offset_at,
    take_snapshot,
    utf8_size_over,
)
from lsp_server.engine_client import resolve_mode
from lsp_server.protocol import client_has_inline_completion, completion_list, inline_items
from lsp_server.settings import SETTINGS_SECTION, Settings, parse_settings
from lsp_server.worker import EngineWorker, Loader, LoadSpec, load_engine

log = logging.getLogger(__name__)

SERVER_NAME = "maskfill-lsp"
SERVER_VERSION = "0.1.0"
STATUS_COMMAND = "maskfill.status"
TOGGLE_COMMAND = "maskfill.toggle"
STATUS_NOTIFICATION = "maskfill/didChangeStatus"  # busy/ready state, like Copilot's
_ENGINE_KEYS = ("model", "device", "quant", "fallback_device", "engine_mode", "engine_endpoint",
                "engine_token_file", "engine_idle_exit_s", "context_reuse")
# Characters after which clients using textDocument/completion ask us again; newest-wins and
# the debounce keep these from flooding the model.
TRIGGER_CHARACTERS = [".", "(", " ", ":", "=", ","]
ENGINE_ERROR_REPEAT_S = 60.0  # the same engine error is shown at most once per this long


class MessageLimiter:
    """Lets one message through at most once per `interval_s` (per distinct text): a failing
    GPU must not bury the editor in one popup per keystroke."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._last_shown: dict[str, float] = {}

    def allow(self, message: str) -> bool:
        now = self._clock()
        last = self._last_shown.get(message)
        if last is not None and now - last < self.interval_s:
            return False
        self._last_shown[message] = now
        return True


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
        self.initialized = False  # set once `initialize` is answered
        self.load_started = False  # set by the `initialized` notification
        self.engine_errors = MessageLimiter(ENGINE_ERROR_REPEAT_S)
        self._logged_large: set[str] = set()
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
        if self.settings != before:
            self.service.settings_changed(reloaded=engine_changed)
        if engine_changed and self.load_started:
            self.start_loading()

    def start_loading(self) -> None:
        self.load_started = True
        s = self.settings
        self.worker.load(
            LoadSpec(
                model=s.model, device=s.device, quant=s.quant, fallback_device=s.fallback_device,
                mode=s.engine_mode, endpoint=s.engine_endpoint, token_file=s.engine_token_file,
                idle_exit_s=s.engine_idle_exit_s, context_reuse=s.context_reuse,
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
            if self.engine_errors.allow(payload["message"]):
                self.show(payload["message"], types.MessageType.Warning)
            else:
                log.info("engine error (not shown again yet): %s", payload["message"])
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
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def watch_parent(self, pid: int) -> None:
        """Exit when the editor's process dies (the LSP `processId`), freeing the model first.

        A failing check is logged and tried again: the watch must not end silently."""
        while True:
            await asyncio.sleep(self.parent_poll_s)
            try:
                alive = pid_alive(pid)
            except Exception:
                log.exception("checking the editor process %d failed; will retry", pid)
                continue
            if not alive:
                log.warning("editor process %d is gone; exiting", pid)
                self.parent_gone()
                return

    def parent_gone(self) -> None:
        self.free()
        logging.shutdown()
        os._exit(0)  # stdin may never close when the editor was killed

    def snapshot(self, uri: str, position: types.Position) -> Snapshot | None:
        """The open document at `position`, or None (unknown, outside, over the size cap)."""
        if not self.initialized:
            raise JsonRpcServerNotInitialized("maskfill: the server is not initialized yet")
        document = find_document(self, uri)
        if document is None:
            return None
        if utf8_size_over(document.source, self.settings.max_document_bytes):
            if uri not in self._logged_large:  # once per document, not per keystroke
                self._logged_large.add(uri)
                log.info("%s is over maxDocumentBytes: no completions for it", uri)
            return None
        return take_snapshot(document, position)

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
            "engineMode": resolve_mode(s.engine_mode, s.device),
            "requests": self.service.requests,
            "cacheHits": self.service.cache.hits,
            "typedThroughHits": self.service.typed.hits,
            "superseded": self.service.latest.superseded,
            **self.worker.stats.snapshot(),
        }


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs. On Windows os.kill(pid, 0) would send CTRL_C_EVENT,
    so the process is queried there instead."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    query_limited_information, still_active, access_denied = 0x1000, 259, 5
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:  # no such process, or one we may not open (then it exists)
        return ctypes.get_last_error() == access_denied  # type: ignore[attr-defined]
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # cannot tell: keep serving rather than quit
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def find_document(ls: MaskfillServer, uri: str) -> TextDocument | None:
    """An open document, or None: never read unopened files from disk."""
    documents = ls.workspace.text_documents
    return documents.get(uri) or documents.get(unquote(uri))


def selection_at(
    snapshot: Snapshot, context: types.InlineCompletionContext | None
) -> Selection | None:
    """The popup selection, when its range is a word ending at the cursor on the cursor's
    line (start <= cursor == end); anything else is ignored, as if no popup were open."""
    info = context.selected_completion_info if context else None
    if info is None:
        return None
    start, end, cursor = info.range.start, info.range.end, snapshot.position
    if not (start.line == end.line == cursor.line and start.character <= end.character):
        return None
    if end.character != cursor.character:
        return None
    start_offset = offset_at(snapshot.text, start, snapshot.codec)
    if start_offset is None:
        return None
    return Selection(
        start=start_offset, end=snapshot.offset, text=info.text, client_start=start
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
        # pygls' documents split lines with str.splitlines; ours use LSP's line breaks.
        workspace = ls.workspace
        ls.protocol._workspace = LspWorkspace(
            workspace.root_uri,
            server._text_document_sync_kind,
            params.workspace_folders or [],
            workspace.position_encoding,
        )
        ls.apply_settings(params.initialization_options)
        if params.process_id is not None and params.process_id != os.getpid():
            ls.spawn(ls.watch_parent(params.process_id))
        # pygls sends the reply as soon as this handler returns: requests that follow it are
        # allowed (the model itself starts loading on `initialized`).
        ls.initialized = True

    @server.feature(types.INITIALIZED)
    def initialized(ls: MaskfillServer, params: types.InitializedParams) -> None:
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
        snapshot = ls.snapshot(params.text_document.uri, params.position)
        if snapshot is None:
            return types.InlineCompletionList(items=[])
        document = find_document(ls, params.text_document.uri)
        selection = selection_at(snapshot, params.context)
        invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        suggestions = await ls.service.suggest(
            snapshot, document, invoked=invoked, selection=selection
        )
        return types.InlineCompletionList(items=inline_items(suggestions))

    @server.feature(
        types.TEXT_DOCUMENT_COMPLETION,
        types.CompletionOptions(trigger_characters=TRIGGER_CHARACTERS),
    )
    async def completion(
        ls: MaskfillServer, params: types.CompletionParams
    ) -> types.CompletionList | None:
        if client_has_inline_completion(ls.client_capabilities):
            return None  # the client shows our inline items; no double suggestions
        snapshot = ls.snapshot(params.text_document.uri, params.position)
        if snapshot is None:
            return None
        document = find_document(ls, params.text_document.uri)
        trigger = params.context.trigger_kind if params.context else None
        invoked = trigger == types.CompletionTriggerKind.Invoked  # manual: all candidates
        suggestions = await ls.service.suggest(snapshot, document, invoked=invoked)
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


async def _pull_configuration(ls: MaskfillServer) -> None:
    with contextlib.suppress(Exception):  # a client that cannot answer keeps the old settings
        values = await ls.workspace_configuration_async(
            types.ConfigurationParams(items=[types.ConfigurationItem(section=SETTINGS_SECTION)])
        )
        if values and isinstance(values[0], dict):
            ls.apply_settings(values[0])
