"""The maskfill language server: registration, lifecycle and thin handlers.

Handlers snapshot, await, convert; the pipeline lives in completion.py, conversion in
protocol.py, message checks in rpc.py, byte streams in transport.py. torch is never imported
here: the engine is imported by the worker thread while the server already answers (requests
wait for the model, up to timeoutMs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import msgspec
from lsprotocol import types
from pygls.exceptions import FeatureRequestError, JsonRpcServerNotInitialized
from pygls.lsp.server import LanguageServer

from engine.api import one_line
from lsp_server.completion import CompletionService, Selection
from lsp_server.context import ContextGatherer, StableContext
from lsp_server.context.gatherer import uri_path
from lsp_server.documents import LspTextDocument, LspWorkspace, Snapshot, offset_at, take_snapshot
from lsp_server.engine_client import resolve_mode
from lsp_server.engine_host import CLOSE_WAIT_S, Loader, LoadSpec, LspEngineHost, load_engine
from lsp_server.protocol import client_has_inline_completion, completion_list, inline_items
from lsp_server.rpc import MaskfillProtocol
from lsp_server.settings import SETTINGS_SECTION, Settings, parse_settings

log = logging.getLogger(__name__)

SERVER_NAME = "maskfill-lsp"
SERVER_VERSION = "0.1.0"
STATUS_COMMAND = "maskfill.status"
TOGGLE_COMMAND = "maskfill.toggle"
STATUS_NOTIFICATION = "maskfill/didChangeStatus"  # busy/ready state, like Copilot's
_ENGINE_KEYS = ("model", "device", "quant", "fallback_device", "engine_mode", "engine_endpoint",
                "engine_token_file", "engine_ca_file", "engine_idle_exit_s", "context_reuse")
# Characters after which clients using textDocument/completion ask us again; newest-wins and
# the debounce keep these from flooding the model.
TRIGGER_CHARACTERS = [".", "(", " ", ":", "=", ","]
ENGINE_ERROR_REPEAT_S = 60.0  # the same engine error is shown at most once per this long
# Process ids an OS can hand out (pid_t is 32-bit signed; Windows ids are DWORDs): anything
# else as the LSP processId is a client bug, not an editor to watch.
# An open, close or save changes the extra-context block; once the user has been idle this long
# after it, the block is re-gathered at the last cursor and the engine pre-warms it (issue 23).
PREWARM_IDLE_S = 0.3
MAX_PID = 2**32 - 1 if sys.platform == "win32" else 2**31 - 1


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
        super().__init__(SERVER_NAME, SERVER_VERSION, protocol_cls=MaskfillProtocol)
        self.overrides = overrides or {}  # CLI --model/--device/--quant win over the client
        self.settings = self._with_overrides(Settings())
        self.parent_poll_s = parent_poll_s
        self.worker = LspEngineHost(loader, on_event=self._engine_event)
        self.service = CompletionService(
            self.worker, lambda: self.settings, on_held=self.notify_status
        )
        self.initialized = False  # set once `initialize` is answered
        self.load_started = False  # set by the `initialized` notification
        self.engine_errors = MessageLimiter(ENGINE_ERROR_REPEAT_S)
        self._auth_shown: set[str] = set()  # refused-token messages already shown
        self._logged_large: set[str] = set()
        self._clamp_shown: tuple[int, int] | None = None
        self.shutdown_requested = False
        self.stop_reason: str | None = None  # why serving ended: exit, end of input, a signal...
        self.stopped = asyncio.Event()  # set by stop_serving; the transport then returns
        self._exit_code: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress_ids = itertools.count(1)
        self._progress_token: str | None = None
        self._progress_begun = False
        self._background: set[asyncio.Task] = set()
        self._prewarm_task: asyncio.Task | None = None

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
        if warnings:  # one message per change, however many keys were wrong
            self.show("; ".join(warnings), types.MessageType.Warning)
        engine_changed = any(
            getattr(before, key) != getattr(self.settings, key) for key in _ENGINE_KEYS
        )
        if self.settings != before:
            self.service.settings_changed(reloaded=engine_changed)
        if engine_changed and self.load_started:
            self.start_loading()
        self._clamp_max_tokens()

    def _clamp_max_tokens(self) -> None:
        """A span budget the model's window cannot hold would fail every request once (and
        retry at half): cap it at half the window, the rest being context, and say so once."""
        info = self.worker.info
        # A window of 0 is unknown (a remote endpoint that does not say): nothing to cut to.
        known = info is not None and info.max_context > 0
        limit = max(1, info.max_context // 2) if known else None
        self.service.max_tokens_limit = limit
        self.service.model_window = info.max_context if info is not None else None
        wanted = self.settings.max_tokens
        if limit is not None and wanted > limit and (wanted, limit) != self._clamp_shown:
            self._clamp_shown = (wanted, limit)
            self.show(
                f"maskfill: maxTokens {wanted} does not fit the model's {info.max_context}-token"
                f" window; using {limit}",
                types.MessageType.Warning,
            )

    def start_loading(self) -> None:
        self.load_started = True
        s = self.settings
        self.worker.load(
            LoadSpec(
                model=s.model, device=s.device, quant=s.quant, fallback_device=s.fallback_device,
                mode=s.engine_mode, endpoint=s.engine_endpoint, token_file=s.engine_token_file,
                ca_file=s.engine_ca_file, idle_exit_s=s.engine_idle_exit_s,
                context_reuse=s.context_reuse,
            )
        )
        self.service.model_state_changed()
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
                "heldRequests": self.service.held,  # waiting for the model to load
            },
        )

    def _engine_event(self, kind: str, payload: dict[str, Any]) -> None:
        """Called on the worker thread (or a job's runner): hop onto the event loop before talking
        to the client."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_engine_event, kind, payload)

    def _on_engine_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "load-begin":
            self._progress_begin(
                f"Loading {payload['model']} on {payload['device']}"
            )
        elif kind == "load-end":
            info = payload["info"]
            self._progress_end(f"{info['family']} model ready on {info['device']}")
            if payload.get("fellBack"):
                self.show(
                    f"maskfill: running on the fallback device {payload['device']}"
                    f" ({payload['reason']})",
                    types.MessageType.Warning,
                )
            self._clamp_max_tokens()
        elif kind == "load-failed":
            self._progress_end("model not loaded")
            self.show(payload["message"], types.MessageType.Error)
        elif kind == "engine-auth":  # the user must fix the token: say it once, as an error
            if payload["message"] not in self._auth_shown:
                self._auth_shown.add(payload["message"])
                self.show(payload["message"], types.MessageType.Error)
        elif kind == "engine-error":
            if self.engine_errors.allow(payload["message"]):
                self.show(payload["message"], types.MessageType.Warning)
            else:
                log.info("engine error (not shown again yet): %s", payload["message"])
        if kind not in ("engine-error", "engine-auth"):
            self.service.model_state_changed()
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

    def workspace_changed(self) -> None:
        """An open, close or save: pre-warm the new block once the user idles."""
        self._arm_prewarm(PREWARM_IDLE_S)

    def not_idle(self) -> None:
        """A keystroke: the next request gathers (and encodes) the block itself. Should the
        user then idle as long as the block's idle rule asks, the block is re-gathered and
        pre-warmed during that pause, not by the next keystroke's request (which would
        encode a changed block cold: the replay's reuse with open files fell for that)."""
        self._arm_prewarm(None)

    def _arm_prewarm(self, delay: float | None) -> None:
        if self._prewarm_task is not None:
            self._prewarm_task.cancel()
            self._prewarm_task = None
        # without an extra-context budget (the embedded model's window) there is no block
        if self.service.context is not None and self.service.extra_budget(self.settings) > 0:
            self._prewarm_task = asyncio.ensure_future(self._prewarm_when_idle(delay))

    async def _prewarm_when_idle(self, delay: float | None) -> None:
        """After `delay` s, or (None) once the stable block's idle rule would re-gather it
        (each request restarts that clock): re-gather, and pre-warm a changed block."""
        if delay is not None:
            await asyncio.sleep(delay)
        else:
            while (left := self.service.context.idle_in()) > 0:
                await asyncio.sleep(left + 0.01)
        self._prewarm_task = None
        if not self.worker.ready:
            return
        try:
            request = self.service.refresh_context()
        except Exception:  # a pre-warm is an optimisation: it must never cost anything else
            log.exception("re-gathering the context for a pre-warm failed")
            return
        if request is not None:
            # Off the event loop: a shared engine's socket send may wait on a stopped engine
            # (up to its send timeout), and the editor's messages must not.
            await asyncio.get_running_loop().run_in_executor(None, self.worker.prewarm, request)

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
        self.stop_serving("the editor process is gone", exit_code=0)  # stdin may never close

    # -- serving ----------------------------------------------------------------------------

    def begin_serving(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called by the transport on its event loop before the first message."""
        self._loop = loop
        self.stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):  # Windows; not main thread
                with contextlib.suppress(ValueError):
                    signal.signal(signum, self._on_signal_threadsafe)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        log.warning("%s received; freeing the model and exiting", name)
        self.stop_serving(name, exit_code=128 + signum)

    def _on_signal_threadsafe(self, signum: int, _frame: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_signal, signum)

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def stop_serving(self, reason: str, exit_code: int | None = None) -> None:
        """End the session: the transport stops reading and __main__ exits. The model starts
        being freed now, so that the exit waits as little as possible."""
        if self.stop_reason is not None:
            return
        log.info("stopping: %s", reason)
        self.stop_reason = reason
        self._exit_code = exit_code
        self.worker.close(timeout=0)
        self.stopped.set()

    def exit_code(self) -> int:
        """LSP: 0 when `shutdown` came before the end, else 1; a signal gives 128 + its
        number (like a shell), the editor's death 0."""
        if self._exit_code is not None:
            return self._exit_code
        return 0 if self.shutdown_requested else 1

    def snapshot(self, uri: str, position: types.Position) -> Snapshot | None:
        """The open document at `position`, or None (unknown, outside, over the size cap)."""
        if not self.initialized:
            raise JsonRpcServerNotInitialized("maskfill: the server is not initialized yet")
        document = find_document(self, uri)
        if document is None:
            return None
        if document.utf8_size() > self.settings.max_document_bytes:
            if uri not in self._logged_large:  # once per document, not per keystroke
                self._logged_large.add(uri)
                log.info("%s is over maxDocumentBytes: no completions for it", uri)
            return None
        return take_snapshot(document, position)

    def document_opened(self, uri: str) -> None:
        """Parse the document's tree now (its first request would otherwise pay for it)."""
        document = find_document(self, uri)
        s = self.settings
        if self.service.context is not None:
            self.service.context.gatherer.opened(uri)
            self.workspace_changed()
        if document is None or not s.syntax or document.utf8_size() > s.max_document_bytes:
            return
        try:
            document.enable_syntax(s.max_document_bytes)
        except Exception:  # no grammar problem may cost the document
            log.exception("no syntax tree for %s; today's rules kept", uri)

    def free(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Free the model (engine.close on the worker thread), waiting at most `timeout`."""
        self.worker.close(timeout=timeout)

    def report_server_error(self, error: Exception, source: Any) -> None:
        """pygls shows every failed notification in a popup: log it, and show it at most
        once a minute (a bug in didChange must not cost one popup per keystroke)."""
        if source is FeatureRequestError:  # already answered to the client, and logged
            return
        log.error("%s: %s", getattr(source, "__name__", source), error)
        message = f"maskfill: internal error ({one_line(error)}); see the server log"
        if self.engine_errors.allow(message):
            self.show(message, types.MessageType.Error)

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
            # tokens; None while unknown (a remote endpoint without GET /v1/models)
            "contextWindow": info.max_context if info and info.max_context > 0 else None,
            "error": self.worker.error,
            "enabled": s.enabled,
            "engineMode": resolve_mode(s.engine_mode, s.device),
            "requests": self.service.requests,
            "heldRequests": self.service.held,
            "cacheHits": self.service.cache.hits,
            "typedThroughHits": self.service.typed.hits,
            "superseded": self.service.latest.superseded,
            "jobsInFlight": self.worker.jobs_in_flight,
            "syntax": {
                "lastCursorKind": self.service.last_cursor_kind,
                "judged": self.service.syntax_judged,
                "hiddenRows": self.service.syntax_hidden_rows,
                "emptied": self.service.syntax_emptied,
            },
            # The extra context the last request carried, as --explain-context prints it.
            "context": json.loads(self.service.last_context.to_json())
            if self.service.last_context is not None else None,
            "extraContextTokens": self.service.extra_budget(s),
            **self.worker.stats.snapshot(),
            # pre-warms the in-process engine has encoded (None: another process's engine)
            "prewarmsEncoded": self.worker.prewarms_encoded,
            # The last completion requests: wall time from the request read to the response
            # written, the engine's part of it, the rest (the server's overhead), CPU times.
            "recentRequests": list(self.protocol.timings.recent),
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


def workspace_roots(params: types.InitializeParams) -> list[Path]:
    """The workspace folders as paths (the gatherer reads files under them only)."""
    uris = [folder.uri for folder in params.workspace_folders or []] or [
        uri for uri in (params.root_uri,) if uri]
    roots = [uri_path(uri) for uri in uris]
    if not roots and params.root_path:
        roots = [Path(params.root_path)]
    return [root for root in roots if root is not None]


def find_document(ls: MaskfillServer, uri: str) -> LspTextDocument | None:
    """An open document, or None: never read unopened files from disk."""
    documents = ls.workspace.text_documents
    document = documents.get(uri) or documents.get(unquote(uri))
    return document if isinstance(document, LspTextDocument) else None


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


class Handlers:
    """The LSP handlers, each a module-level function decorated as pygls' examples decorate
    theirs (`@server.feature(...)`): the decorators record it here, and `register` puts every
    recorded one on a server. Their state is the server's (`ls`), so several servers can live
    in one process (the tests make many)."""

    def __init__(self) -> None:
        self._features: list[tuple[str, Any, Callable[..., Any]]] = []
        self._commands: list[tuple[str, Callable[..., Any]]] = []

    def feature(self, name: str, options: Any = None) -> Callable[[Callable], Callable]:
        def record(handler: Callable[..., Any]) -> Callable[..., Any]:
            self._features.append((name, options, handler))
            return handler

        return record

    def command(self, name: str) -> Callable[[Callable], Callable]:
        def record(handler: Callable[..., Any]) -> Callable[..., Any]:
            self._commands.append((name, handler))
            return handler

        return record

    def register(self, server: LanguageServer) -> None:
        for name, options, handler in self._features:
            server.feature(name, options)(handler)
        for name, handler in self._commands:
            server.command(name)(handler)


handlers = Handlers()


def create_server(
    *,
    overrides: dict[str, Any] | None = None,
    loader: Loader = load_engine,
    parent_poll_s: float = 1.0,
) -> MaskfillServer:
    server = MaskfillServer(overrides=overrides, loader=loader, parent_poll_s=parent_poll_s)
    handlers.register(server)
    return server


@handlers.feature(types.INITIALIZE)
def initialize(ls: MaskfillServer, params: types.InitializeParams) -> None:
    if ls._loop is None:
        ls._loop = asyncio.get_running_loop()
    # pygls' documents split lines with str.splitlines; ours use LSP's line breaks.
    workspace = ls.workspace
    ls.protocol._workspace = LspWorkspace(
        workspace.root_uri,
        ls._text_document_sync_kind,
        params.workspace_folders or [],
        workspace.position_encoding,
    )
    ls.apply_settings(params.initialization_options)
    ls.service.context = StableContext(ContextGatherer(
        workspace_roots(params), lambda: list(ls.workspace.text_documents.values())))
    pid = params.process_id
    if pid is not None and not 0 < pid <= MAX_PID:
        log.warning("processId %r is not a possible process id: not watching the editor", pid)
    elif pid is not None and pid != os.getpid():
        ls.spawn(ls.watch_parent(pid))
    # pygls sends the reply as soon as this handler returns: requests that follow it are
    # allowed (the model itself starts loading on `initialized`).
    ls.initialized = True


@handlers.feature(types.INITIALIZED)
def initialized(ls: MaskfillServer, params: types.InitializedParams) -> None:
    if not ls.load_started:  # a repeated `initialized` does not reload the model
        ls.start_loading()


@handlers.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(ls: MaskfillServer, params: types.DidChangeConfigurationParams):
    if isinstance(params.settings, dict) and params.settings:
        ls.apply_settings(params.settings)
        return
    workspace = ls.client_capabilities.workspace if ls.client_capabilities else None
    if workspace and workspace.configuration:  # pull model: ask, off the request path
        ls.spawn(_pull_configuration(ls))


@handlers.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: MaskfillServer, params: types.DidOpenTextDocumentParams) -> None:
    ls.document_opened(params.text_document.uri)


@handlers.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: MaskfillServer, params: types.DidChangeTextDocumentParams) -> None:
    context = ls.service.context
    if context is None or not params.content_changes:
        return
    change = params.content_changes[0]
    line = change.range.start.line if isinstance(
        change, types.TextDocumentContentChangePartial) else 0
    context.gatherer.edited(params.text_document.uri, line)
    context.activity()
    ls.not_idle()


@handlers.feature(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: MaskfillServer, params: types.DidCloseTextDocumentParams) -> None:
    if ls.service.context is not None:
        ls.service.context.gatherer.closed(params.text_document.uri)
        ls.workspace_changed()


@handlers.feature(types.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: MaskfillServer, params: types.DidSaveTextDocumentParams) -> None:
    if ls.service.context is not None:
        ls.service.context.gatherer.saved(params.text_document.uri)
        ls.workspace_changed()


@handlers.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
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


@handlers.feature(
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


@handlers.command(STATUS_COMMAND)
def status(ls: MaskfillServer, *args: Any) -> dict[str, Any]:
    return ls.status()


@handlers.command(TOGGLE_COMMAND)
def toggle(ls: MaskfillServer, *args: Any) -> dict[str, Any]:
    ls.settings = msgspec.structs.replace(ls.settings, enabled=not ls.settings.enabled)
    ls.notify_status()
    return {"enabled": ls.settings.enabled}


@handlers.feature(types.SHUTDOWN)
def shutdown(ls: MaskfillServer, *args: Any) -> None:
    ls.shutdown_requested = True
    ls.free(timeout=0)  # starts freeing; `exit` waits for it (briefly, see __main__)


async def _pull_configuration(ls: MaskfillServer) -> None:
    with contextlib.suppress(Exception):  # a client that cannot answer keeps the old settings
        values = await ls.workspace_configuration_async(
            types.ConfigurationParams(items=[types.ConfigurationItem(section=SETTINGS_SECTION)])
        )
        if values and isinstance(values[0], dict):
            ls.apply_settings(values[0])

