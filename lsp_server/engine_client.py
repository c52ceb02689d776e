"""Where the worker's engine lives: in this process, in the user's shared engine process, or
behind a remote HTTP FIM endpoint. `make_engine` is the worker's loader for the last two.

`engineMode: "auto"` (the default) shares one engine process when the device is a GPU, where
every window holding its own copy of the model runs out of memory, and keeps the model in this
process on CPU, where a tiny model loads in a second and a separate process only adds a hop.
torch is never imported here: the engine process or the remote server owns the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from engine.api import (
    Candidate,
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    EngineAuthError,
    EngineError,
    EngineInfo,
    EngineUnavailable,
)
from engine.model.embedded_model import default_model_path as embedded_model_path
from engine.serve import paths
from engine.serve.client import EngineConnection, EngineGone, cancelled_result
from engine.serve.launcher import EngineExited, EngineLocation, connect_or_start, wait_ready
from engine.serve.tls import client_context, handshake_failure

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 1800.0  # a 7B model from a cold disk; the editor shows progress meanwhile
REMOTE_CONNECT_TIMEOUT_S = 5.0
# Past a request's timeoutMs, how long a silent engine (stopped, hung, swamped) is waited for
# before the request answers nothing: the editor's ghost text must never hang on it.
ANSWER_SLACK_S = 2.0
REMOTE_DEFAULT_TIMEOUT_S = 30.0  # a request without a deadline (the HTTP API's own default)
CANCEL_WAIT_S = 0.5  # a cancelled request's wait for the shared engine to acknowledge it
# An engine that dies while starting or loading is started again this many times (then the
# load fails with the reason); a user-run engine (engineEndpoint) is never started by us.
LOAD_RESTARTS = 2
RECONNECT_PAUSE_S = 30.0  # after a failed restart, requests answer nothing this long
CANCEL_POLL_S = 0.005
FIM_PATH = "/v1/fim/completions"
MODELS_PATH = "/v1/models"
SESSION_HEADER = "x-session-id"  # what engine/serve/cluster routes on (contract.SESSION_HEADER)
# Where OpenAI-compatible servers put a model's window in GET /v1/models: ours and vLLM
# (max_model_len), OpenRouter and ours (context_length), LM Studio (max_context_length).
WINDOW_FIELDS = ("max_model_len", "context_length", "max_context_length")
_SESSION_NONCE = secrets.token_hex(16)  # one editor session: this server process


def resolve_mode(mode: str, device: str) -> str:
    if mode != "auto":
        return mode
    return "shared" if device.startswith("cuda") else "inprocess"


def make_engine(spec) -> SharedEngine | RemoteEngine:
    """Loader for the shared and remote modes (spec: lsp_server.engine_host.LoadSpec)."""
    mode = resolve_mode(spec.mode, spec.device)
    if mode == "remote":
        return RemoteEngine.open(spec.endpoint, spec.token_file, spec.model,
                                 ca_file=spec.ca_file)
    if mode != "shared":
        raise EngineError(f"unknown engineMode {mode!r}")
    return SharedEngine.open(spec)


def _client_name() -> str:
    return f"maskfill-lsp {os.getpid()}"


class SharedEngine:
    """EngineLike over a connection to `maskfill-engine serve`, restarted when it dies.

    Concurrent calls share the connection (it routes each answer to its call by id) and the
    engine batches them with the other windows' requests. A request never waits on the engine
    past its timeoutMs + ANSWER_SLACK_S, nor past its cancel: not for a stopped engine, and not
    for one being restarted (that happens on a thread of its own)."""

    concurrent_calls = True

    def __init__(self, spec, model: str):
        self._spec = spec
        self._model = model
        self._connection: EngineConnection | None = None
        self._info: EngineInfo | None = None
        self._lock = threading.Lock()
        self._reconnect: Future | None = None  # a restart in progress, or the last failed one
        self._reconnect_failed_at = 0.0
        self._closed = False

    @classmethod
    def open(cls, spec) -> SharedEngine:
        model = spec.model or _embedded_model()
        if model is None and not spec.endpoint:
            raise EngineError("no model configured: this install has no embedded model; set "
                              "the `model` setting to a checkpoint folder or repo id")
        engine = cls(spec, model or "")
        engine._connection = engine._connect()
        return engine

    def _connect(self) -> EngineConnection:
        """A ready connection; an auto-started engine that dies while starting or loading is
        started again, LOAD_RESTARTS times at most."""
        deaths: list[str] = []
        while True:
            try:
                return self._connect_once()
            except (EngineGone, EngineExited) as exc:
                if self._spec.endpoint:  # the user runs it: nothing for us to start
                    raise EngineError(f"the engine at {self._spec.endpoint} stopped while "
                                      f"loading ({exc})") from None
                deaths.append(str(exc))
                if len(deaths) > LOAD_RESTARTS:
                    raise EngineError(
                        f"the shared engine exited while starting or loading the model "
                        f"{len(deaths)} times in a row (last: {exc}); completions are off "
                        "until the settings change") from None
                log.warning("the shared engine exited while loading (%s); starting it again "
                            "(restart %d of %d)", exc, len(deaths), LOAD_RESTARTS)

    def _connect_once(self) -> EngineConnection:
        spec = self._spec
        if spec.endpoint:  # a user-managed engine: connect, never start one
            connection = _connect_endpoint(spec.endpoint, spec.token_file, spec.ca_file)
        else:
            location = EngineLocation(self._model, spec.device, spec.quant)
            connection = connect_or_start(location, _client_name(),
                                          idle_exit_s=spec.idle_exit_s)
        try:
            wait_ready(connection, LOAD_TIMEOUT_S)
            self._info = connection.status().info
        except Exception:
            connection.close()
            raise
        log.info("connected to the shared engine (pid %d)", connection.welcome.pid)
        return connection

    @property
    def engine_pid(self) -> int | None:
        connection = self._connection
        return connection.welcome.pid if connection else None

    def complete(self, request: CompletionRequest,
                 cancel: threading.Event | None = None) -> CompletionResult:
        connection = self._live_connection(request, cancel)
        if connection is None:
            return cancelled_result()
        try:
            return connection.complete(request, cancel, slack_s=ANSWER_SLACK_S,
                                       cancel_wait_s=CANCEL_WAIT_S)
        except EngineGone as exc:
            with self._lock:  # another call may already have connected a new one: keep it
                if self._connection is connection:
                    self._connection = None
            raise EngineError(f"the shared engine stopped ({exc}); it is restarted for the "
                              "next request") from None

    def prewarm(self, request: CompletionRequest) -> bool:
        """Ask the shared engine to encode `request`'s context when idle (fire and forget);
        False when it cannot: no live connection (a pre-warm starts no engine), or an engine
        of an older install, which does not name "prewarm" in its Welcome and would drop the
        connection on the unknown message."""
        connection = self._connection
        if connection is None or not connection.alive:
            return False
        try:
            return connection.prewarm(request)
        except EngineGone:
            return False  # the next request reconnects

    def _live_connection(self, request: CompletionRequest,
                         cancel: threading.Event | None) -> EngineConnection | None:
        """The connection, restarting the engine if it is gone; None when cancelled first."""
        with self._lock:
            connection = self._connection
            if connection is not None and connection.alive:
                return connection
            self._connection = None
            if connection is not None:
                connection.close()  # lost: free its socket before the next one
            pending = self._reconnect
            if pending is None or (pending.done() and time.monotonic()
                                   - self._reconnect_failed_at > RECONNECT_PAUSE_S):
                pending = self._reconnect = self._start_reconnect()
        limit = (request.timeout_ms / 1000 + ANSWER_SLACK_S if request.timeout_ms
                 else LOAD_TIMEOUT_S)
        deadline = time.monotonic() + limit
        while not pending.done():
            if cancel is not None and cancel.is_set():
                return None
            if time.monotonic() > deadline:
                raise EngineUnavailable("the shared engine is restarting; answering nothing "
                                        "until it has loaded the model")
            time.sleep(0.01 if cancel is not None else 0.05)
        if pending.exception() is not None:
            raise EngineUnavailable(f"the shared engine could not be restarted: "
                                    f"{pending.exception()}")
        connection = pending.result()
        if not connection.alive:
            raise EngineUnavailable("the restarted shared engine stopped again")
        return connection

    def _start_reconnect(self) -> Future:
        """Connect (restarting the engine) on a thread of its own (lock held)."""
        future: Future = Future()

        def reconnect() -> None:
            try:
                connection = self._connect()
            except BaseException as exc:  # handed to the waiting requests
                with self._lock:
                    self._reconnect_failed_at = time.monotonic()
                future.set_exception(exc)
                return
            with self._lock:
                if self._closed:
                    connection.close()
                else:
                    self._connection = connection
                    self._reconnect = None
            future.set_result(connection)

        threading.Thread(target=reconnect, name="maskfill-engine-restart", daemon=True).start()
        return future

    def info(self) -> EngineInfo:
        assert self._info is not None
        return self._info

    def close(self) -> None:
        """Leave the engine running for the other windows; it exits once idle."""
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _connect_endpoint(endpoint: str, token_file: str | None,
                      ca_file: str | None = None) -> EngineConnection:
    """A user-run engine: unix:/path, tcp://host:port, or tls://host:port (its certificate
    checked against engineCaFile, else the system's CAs, and its host name too). One deadline
    covers connect, handshake and hello: an engine silent past it raises EngineSetupTimeout,
    which says the stage and is passed on as it is (never retried, like EngineTlsError)."""
    parsed = urllib.parse.urlparse(endpoint)
    if parsed.scheme == "unix":
        return EngineConnection.unix(parsed.path, name=_client_name())
    if parsed.scheme in ("tcp", "tls") and parsed.hostname and parsed.port:
        tls = client_context(ca_file) if parsed.scheme == "tls" else None
        token = paths.read_token(_token_path(token_file))
        try:
            return EngineConnection.tcp(parsed.hostname, parsed.port, token=token,
                                        name=_client_name(), tls=tls)
        except OSError as exc:
            raise EngineError(f"the engine at {endpoint} is unreachable: {exc}") from None
        except EngineGone as exc:  # not a death to restart for: say what may be wrong
            hint = (" (if it serves TLS, --tls-cert, use tls://HOST:PORT)"
                    if tls is None else "")
            raise EngineError(f"the engine at {endpoint} closed the connection: {exc}{hint}"
                              ) from None
    raise EngineError(f"engineEndpoint {endpoint!r} in shared mode must be unix:/path/to.sock, "
                      "tcp://127.0.0.1:PORT or tls://HOST:PORT")


def _token_path(token_file: str | None) -> Path:
    return Path(token_file).expanduser() if token_file else (
        paths.runtime_dir() / paths.TOKEN_FILE_NAME)


def _embedded_model() -> str | None:
    path = embedded_model_path()
    return str(path) if path else None


class RemoteEngine:
    """EngineLike over an HTTP FIM endpoint in Mercury Coder's shape (ours or a hosted one).

    Each call runs its HTTP exchange on a helper thread so that a set cancel Event can abort
    it at once: the connection is closed, which our engine sees and turns into a cancel. Each
    call has its own connection, so concurrent calls are independent. A call answers by its
    timeoutMs + ANSWER_SLACK_S, whatever the endpoint does. Each request carries the editing
    session (`x-session-id`: this server process and the document, hashed) that a cluster
    routes on, so a document's keystrokes meet their warm context."""

    concurrent_calls = True
    keyed_calls = True  # complete() takes the document's key (the worker passes it)

    def __init__(self, url: str, token: str | None, model: str | None,
                 ca_file: str | None = None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise EngineError(f"engineEndpoint {url!r} in remote mode must be an http(s) URL")
        self.url = url
        self._parsed = parsed
        path = parsed.path.rstrip("/")
        self._path = path if path.endswith("/completions") else path + FIM_PATH
        # The API's root (under which /health and /v1/models live).
        self._base = next((self._path[: -len(tail)] for tail in (FIM_PATH, "/v1/completions")
                           if self._path.endswith(tail)), "")
        self._token = token
        # https: the endpoint's certificate checked against engineCaFile, else the system CAs.
        self._tls = client_context(ca_file) if parsed.scheme == "https" else None
        self._token_source: Path | None = None  # read again when it changes (a fixed token)
        self._token_stamp: tuple[int, int] | None = None
        self._model = model
        # max_context 0: the window is unknown (the server then does not cut maxTokens).
        self._info = EngineInfo(model=model or "remote", path=url, family="remote",
                                device="remote", dtype="", quant="none", weight_bytes=0,
                                parameters=0, max_context=0, load_ms=0.0)

    @classmethod
    def open(cls, url: str | None, token_file: str | None, model: str | None,
             ca_file: str | None = None) -> RemoteEngine:
        if not url:
            raise EngineError("engineMode is remote but engineEndpoint is not set")
        token_path = Path(token_file).expanduser() if token_file else None
        token = paths.read_token(token_path) if token_path else None
        engine = cls(url, token, model, ca_file)
        engine._token_source = token_path
        engine._token_stamp = _stamp(token_path)
        engine.probe()
        return engine

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        p = self._parsed
        if self._tls is not None:
            return http.client.HTTPSConnection(p.hostname, p.port, timeout=timeout,
                                               context=self._tls)
        return http.client.HTTPConnection(p.hostname, p.port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        self._reread_token()
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _reread_token(self) -> None:
        """A token file that changed since it was read (the user fixed a refused token) is read
        again, so the next request uses it without a reload."""
        if self._token_source is None:
            return
        stamp = _stamp(self._token_source)
        if stamp == self._token_stamp:
            return
        self._token_stamp = stamp
        try:
            self._token = paths.read_token(self._token_source)
        except EngineError as exc:
            raise EngineAuthError(f"the token file cannot be used: {exc}") from None

    def probe(self) -> None:
        """Fail the load with a clear message when nothing answers at the endpoint (any HTTP
        answer, even a 404 from a hosted API without /health, means it is reachable), then
        learn the model's window from GET /v1/models where the endpoint has it."""
        started = time.perf_counter()
        connection = self._connection(REMOTE_CONNECT_TIMEOUT_S)
        try:
            connection.request("GET", self._base + "/health")
            connection.getresponse().read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            connection.close()
        name, window = self._model_window()
        self._info = dataclasses.replace(
            self._info, model=name or self._info.model, max_context=window or 0,
            load_ms=(time.perf_counter() - started) * 1000)

    def _unreachable(self, exc: BaseException) -> EngineError:
        if isinstance(exc, ssl.SSLCertVerificationError):  # say which setting fixes it
            return handshake_failure(exc, self.url)
        return EngineError(f"the remote engine at {self.url} is unreachable: {exc}")

    def _silent(self, limit: float | None) -> EngineUnavailable:
        return EngineUnavailable(f"the remote engine at {self.url} gave no answer "
                                 f"within {limit or 0:.1f} s")

    def _model_window(self) -> tuple[str | None, int | None]:
        """(model id, context window) from GET /v1/models: the entry named by the `model`
        setting, else the only one. (None, None) when the endpoint does not say: a hosted API
        without the route, a token not allowed to list models, an answer in another shape."""
        connection = self._connection(REMOTE_CONNECT_TIMEOUT_S)
        try:
            connection.request("GET", self._base + MODELS_PATH, headers=self._headers())
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            log.info("GET %s failed (%s): the model's window is unknown", MODELS_PATH, exc)
            return None, None
        finally:
            connection.close()
        if response.status != 200:
            log.info("GET %s answered %d (%s): the model's window is unknown", MODELS_PATH,
                     response.status, _error_message(raw))
            return None, None
        try:
            entries = [e for e in json.loads(raw)["data"] if isinstance(e, dict)]
        except (ValueError, KeyError, TypeError):
            log.info("GET %s: no data[] list: the model's window is unknown", MODELS_PATH)
            return None, None
        named = [e for e in entries if self._model and e.get("id") == self._model]
        entry = named[0] if named else entries[0] if len(entries) == 1 else None
        if entry is None:
            return None, None
        window = next((entry[f] for f in WINDOW_FIELDS if isinstance(entry.get(f), int)
                       and not isinstance(entry.get(f), bool) and entry[f] > 0), None)
        name = entry.get("id") if isinstance(entry.get("id"), str) else None
        return name, window

    def body(self, request: CompletionRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": request.prefix, "suffix": request.suffix,
            "max_tokens": request.max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "n": request.num_candidates,
        }
        if request.stop == "line":
            body["stop"] = ["\n"]
        if self._model:
            body["model"] = self._model
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    def complete(self, request: CompletionRequest, cancel: threading.Event | None = None,
                 *, key: str = "") -> CompletionResult:
        limit = (request.timeout_ms / 1000 if request.timeout_ms else REMOTE_DEFAULT_TIMEOUT_S)
        limit += ANSWER_SLACK_S
        connection = self._connection(limit)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def exchange() -> None:
            try:
                outcome["value"] = self._exchange(connection, request, key)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                done.set()

        started = time.perf_counter()
        deadline = time.monotonic() + limit
        threading.Thread(target=exchange, name="maskfill-remote", daemon=True).start()
        while not done.wait(CANCEL_POLL_S):
            if cancel is not None and cancel.is_set():
                _abort(connection)  # the server sees the hang-up and stops the model
                return cancelled_result()
            if time.monotonic() > deadline:
                _abort(connection)
                raise self._silent(limit)
        connection.close()
        if "error" in outcome:
            raise outcome["error"]
        return self._result(outcome["value"], (time.perf_counter() - started) * 1000)

    def _exchange(self, connection: http.client.HTTPConnection,
                  request: CompletionRequest, key: str) -> dict[str, Any]:
        headers = {**self._headers(), "Content-Type": "application/json"}
        if key:
            headers[SESSION_HEADER] = session_id(key)
        try:
            connection.request("POST", self._path, body=json.dumps(self.body(request)),
                               headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except TimeoutError:
            # The socket's timeout is the call's deadline too: whichever of the two notices
            # the silence first, it is the same answer, never a retry at half the span.
            raise self._silent(connection.timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        if response.status in (401, 403):  # no retry can fix a refused credential
            raise EngineAuthError(
                f"the remote engine at {self.url} refused the token ({response.status}: "
                f"{_error_message(raw)}); put the right token in engineTokenFile: it is "
                "read again at the next request")
        if response.status != 200:
            raise EngineError(f"the remote engine answered {response.status}: "
                              f"{_error_message(raw)}")
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineError("the remote engine answered with invalid JSON") from None

    def _result(self, data: dict[str, Any], total_ms: float) -> CompletionResult:
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            candidates = [Candidate(text=str(c["text"]), mean_confidence=0.0, span_length=0,
                                    ended=c.get("finish_reason") == "stop") for c in choices]
        except (KeyError, TypeError, AttributeError):
            raise EngineError("the remote engine's answer has no choices[].text") from None
        usage = data.get("usage") or {}
        stats = CompletionStats(timings_ms={"total": total_ms},
                                prefix_tokens=int(usage.get("prompt_tokens") or 0))
        return CompletionResult(text=candidates[0].text if candidates else "",
                                candidates=candidates, stats=stats)

    def info(self) -> EngineInfo:
        return self._info

    def close(self) -> None:
        pass  # one connection per request: nothing held


def _stamp(path: Path | None) -> tuple[int, int] | None:
    try:
        info = path.stat() if path is not None else None
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size) if info is not None else None


def session_id(key: str) -> str:
    """The editing session a request belongs to: this server process and the document,
    hashed (stable for the document while the editor runs; no path or secret in it)."""
    digest = hashlib.blake2b(f"{_SESSION_NONCE}\0{key}".encode("utf-8", "surrogatepass"),
                             digest_size=16)
    return "maskfill-" + digest.hexdigest()


def _abort(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    connection.close()


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error or data.get("detail")
        return str(message or raw[:200].decode(errors="replace"))
    except (ValueError, AttributeError):
        return raw[:200].decode(errors="replace").strip() or "(empty body)"
