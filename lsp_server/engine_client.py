"""Where the worker's engine lives: in this process, in the user's shared engine process, or
behind a remote HTTP FIM endpoint. `make_engine` is the worker's loader for the last two.

`engineMode: "auto"` (the default) shares one engine process when the device is a GPU, where
every window holding its own copy of the model runs out of memory, and keeps the model in this
process on CPU, where a tiny model loads in a second and a separate process only adds a hop.
torch is never imported here: the engine process or the remote server owns the model.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from engine.api import (
    Candidate,
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    EngineError,
    EngineInfo,
)
from engine.service import paths
from engine.service.client import EngineConnection, EngineGone, cancelled_result
from engine.service.launcher import EngineLocation, connect_or_start, wait_ready

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 1800.0  # a 7B model from a cold disk; the editor shows progress meanwhile
REMOTE_CONNECT_TIMEOUT_S = 5.0
REMOTE_SLACK_S = 5.0  # beyond the request's own deadline
CANCEL_POLL_S = 0.005
FIM_PATH = "/v1/fim/completions"


def resolve_mode(mode: str, device: str) -> str:
    if mode != "auto":
        return mode
    return "shared" if device.startswith("cuda") else "inprocess"


def make_engine(spec) -> SharedEngine | RemoteEngine:
    """Loader for the shared and remote modes (spec: lsp_server.worker.LoadSpec)."""
    mode = resolve_mode(spec.mode, spec.device)
    if mode == "remote":
        return RemoteEngine.open(spec.endpoint, spec.token_file, spec.model)
    if mode != "shared":
        raise EngineError(f"unknown engineMode {mode!r}")
    return SharedEngine.open(spec)


def _client_name() -> str:
    return f"maskfill-lsp {os.getpid()}"


class SharedEngine:
    """EngineLike over a connection to `maskfill-engine serve`, restarted when it dies.

    Concurrent calls share the connection (it routes each answer to its call by id) and the
    engine batches them with the other windows' requests."""

    concurrent_calls = True

    def __init__(self, spec, model: str):
        self._spec = spec
        self._model = model
        self._connection: EngineConnection | None = None
        self._info: EngineInfo | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, spec) -> SharedEngine:
        model = spec.model or _embedded_model()
        if model is None and not spec.endpoint:
            raise EngineError("no model configured: this install has no embedded model; set "
                              "the `model` setting to a checkpoint folder or repo id")
        engine = cls(spec, model or "")
        engine._connect()
        return engine

    def _connect(self) -> EngineConnection:
        spec = self._spec
        if spec.endpoint:  # a user-managed engine: connect, never start one
            connection = _connect_endpoint(spec.endpoint, spec.token_file)
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
        self._connection = connection
        return connection

    @property
    def engine_pid(self) -> int | None:
        return self._connection.welcome.pid if self._connection else None

    def complete(self, request: CompletionRequest,
                 cancel: threading.Event | None = None) -> CompletionResult:
        with self._lock:
            connection = self._connection
            if connection is None or not connection.alive:
                self._connection = None
                if connection is not None:
                    connection.close()  # lost: free its socket before the next one
                connection = self._connect()  # restarts the engine if it is gone
        try:
            return connection.complete(request, cancel)
        except EngineGone as exc:
            with self._lock:  # another call may already have connected a new one: keep it
                if self._connection is connection:
                    self._connection = None
            raise EngineError(f"the shared engine stopped ({exc}); it is restarted for the "
                              "next request") from None

    def info(self) -> EngineInfo:
        assert self._info is not None
        return self._info

    def close(self) -> None:
        """Leave the engine running for the other windows; it exits once idle."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _connect_endpoint(endpoint: str, token_file: str | None) -> EngineConnection:
    parsed = urllib.parse.urlparse(endpoint)
    if parsed.scheme == "unix":
        return EngineConnection.unix(parsed.path, name=_client_name())
    if parsed.scheme == "tcp" and parsed.hostname and parsed.port:
        token = paths.read_token(_token_path(token_file))
        try:
            return EngineConnection.tcp(parsed.hostname, parsed.port, token=token,
                                        name=_client_name())
        except OSError as exc:
            raise EngineError(f"the engine at {endpoint} is unreachable: {exc}") from None
    raise EngineError(f"engineEndpoint {endpoint!r} in shared mode must be unix:/path/to.sock "
                      "or tcp://127.0.0.1:PORT")


def _token_path(token_file: str | None) -> Path:
    return Path(token_file).expanduser() if token_file else (
        paths.runtime_dir() / paths.TOKEN_FILE_NAME)


def _embedded_model() -> str | None:
    from lsp_server.worker import default_model_path

    return default_model_path()


class RemoteEngine:
    """EngineLike over an HTTP FIM endpoint in Mercury Coder's shape (ours or a hosted one).

    Each call runs its HTTP exchange on a helper thread so that a set cancel Event can abort
    it at once: the connection is closed, which our engine sees and turns into a cancel. Each
    call has its own connection, so concurrent calls are independent."""

    concurrent_calls = True

    def __init__(self, url: str, token: str | None, model: str | None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise EngineError(f"engineEndpoint {url!r} in remote mode must be an http(s) URL")
        self.url = url
        self._parsed = parsed
        path = parsed.path.rstrip("/")
        self._path = path if path.endswith("/completions") else path + FIM_PATH
        self._token = token
        self._model = model
        self._info = EngineInfo(model=model or "remote", path=url, family="remote",
                                device="remote", dtype="", quant="none", weight_bytes=0,
                                parameters=0, max_context=0, load_ms=0.0)

    @classmethod
    def open(cls, url: str | None, token_file: str | None, model: str | None) -> RemoteEngine:
        if not url:
            raise EngineError("engineMode is remote but engineEndpoint is not set")
        token = paths.read_token(Path(token_file).expanduser()) if token_file else None
        engine = cls(url, token, model)
        engine.probe()
        return engine

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        p = self._parsed
        kind = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        return kind(p.hostname, p.port, timeout=timeout)

    def probe(self) -> None:
        """Fail the load with a clear message when nothing answers at the endpoint (any HTTP
        answer, even a 404 from a hosted API without /health, means it is reachable)."""
        started = time.perf_counter()
        connection = self._connection(REMOTE_CONNECT_TIMEOUT_S)
        try:
            connection.request("GET", self._path.rsplit(FIM_PATH, 1)[0] + "/health")
            connection.getresponse().read()
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"the remote engine at {self.url} is unreachable: {exc}") from None
        finally:
            connection.close()
        self._info = dataclasses.replace(
            self._info, load_ms=(time.perf_counter() - started) * 1000)

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

    def complete(self, request: CompletionRequest,
                 cancel: threading.Event | None = None) -> CompletionResult:
        timeout = (request.timeout_ms or 30_000) / 1000 + REMOTE_SLACK_S
        connection = self._connection(timeout)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def exchange() -> None:
            try:
                outcome["value"] = self._exchange(connection, request)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                done.set()

        started = time.perf_counter()
        threading.Thread(target=exchange, name="maskfill-remote", daemon=True).start()
        while not done.wait(CANCEL_POLL_S if cancel is not None else None):
            if cancel is not None and cancel.is_set():
                _abort(connection)  # the server sees the hang-up and stops the model
                return cancelled_result()
        connection.close()
        if "error" in outcome:
            raise outcome["error"]
        return self._result(outcome["value"], (time.perf_counter() - started) * 1000)

    def _exchange(self, connection: http.client.HTTPConnection,
                  request: CompletionRequest) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            connection.request("POST", self._path, body=json.dumps(self.body(request)),
                               headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"the remote engine at {self.url} is unreachable: {exc}") from None
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
