"""HTTP front end: `POST /v1/fim/completions` in the shape of Mercury Coder's FIM API (model,
prompt, suffix, max_tokens, temperature, top_p, stop, n -> choices[].text, finish_reason,
usage), plus `GET /health` and `GET /metrics` (Prometheus text). `stream: true` answers as
server-sent events; with `stream_drafts: true` too, the partial fills come as the model
denoises, before the answer (engine/serve/peer_api.py).

aiohttp parses HTTP; msgspec validates the body, so a bad field is named in a 400. A body over
the limit is refused from its Content-Length, or while it streams in, never read whole. Every
route but /health needs `Authorization: Bearer <token>`.

A stranger can hold little (issue 20.6): a connection has `read_timeout_s` to send its request
head (and as long idle between requests), a body has as long to arrive, the token is checked
before any body is read and a refused caller's connection is closed, open connections are capped
below the file limit with descriptors to spare for the editors' Unix socket, and on a loopback
address only a loopback `Host` is answered (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import logging
import ssl
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from engine.api import (
    CompletionRequest,
    EngineInputError,
)
from engine.request_checks import validate
from engine.serve.connection_cap import ACCEPT_BACKLOG, connection_limit
from engine.serve.fim_wire import (
    HTTP_TIMEOUT_MS,
    ApiError,
    FimRequest,
    _error,
    stop_strings,
    to_engine_request,
    to_response,
)
from engine.serve.host import Job
from engine.serve.log_throttle import ThrottledLog
from engine.serve.metrics import CONTENT_TYPE, registry_for, render

if TYPE_CHECKING:
    from engine.serve.server import EngineService

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 15.0  # request head, body, and idle keep-alive, each
LINGER_S = 1.0  # reading (and dropping) the unread body of a refused request before closing
MAX_CONNECTIONS = 128  # open HTTP connections, at most (fewer under a low file limit)
SESSION_HEADERS = ("x-session-id", "x-session")  # a caller's own fairness key (the cluster's too)
MAX_SESSION_CHARS = 512
LOOPBACK_HOSTS = ("localhost",)

refused_log = ThrottledLog(log, "HTTP connections refused (over the connection cap)")


def host_is_this_loopback_server(host: str | None, local: tuple | None, tls: bool,
                                 allowed: frozenset[str] = frozenset()) -> bool:
    """DNS rebinding: a web page can point a name it owns at 127.0.0.1 and have the browser
    call us; the browser still sends that name as Host. On a loopback socket only a loopback
    Host with our port is served, or a name in `allowed` (a reverse proxy that passes on its
    own Host, as Caddy does). No Host (HTTP/1.0) is no browser."""
    if host is None or not local:
        return True
    try:
        if not ipaddress.ip_address(str(local[0]).split("%")[0]).is_loopback:
            return True  # a public address: its clients name it as they like
    except ValueError:
        return True
    name, port = host.lower(), ""
    if name.startswith("["):
        name, _, rest = name[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif name.count(":") == 1:
        name, _, port = name.partition(":")
    if name in allowed:
        return True
    if name not in LOOPBACK_HOSTS:
        try:
            if not ipaddress.ip_address(name).is_loopback:
                return False
        except ValueError:
            return False
    default_port = 443 if tls else 80
    return (port.isdigit() and int(port) == local[1]) or (not port and local[1] == default_port)


def fairness_client(request: web.Request) -> int:
    """The scheduler's fairness unit for an HTTP caller: its session header (x-session-id or
    X-Session) when it sends one, else its address and User-Agent, so a script and an editor
    plugin on one host take separate turns. Hashed to a negative id (socket clients are
    positive); nothing is kept per caller."""
    session = next((v for h in SESSION_HEADERS if (v := request.headers.get(h))), None)
    if session is not None and len(session) > MAX_SESSION_CHARS:
        raise _error(400, f"{SESSION_HEADERS[0]}: at most {MAX_SESSION_CHARS} characters")
    key = (f"session\0{session}" if session else
           f"peer\0{request.remote}\0{request.headers.get('User-Agent', '')}")
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=7).digest()
    return -1 - int.from_bytes(digest, "big")


class FimApi:
    def __init__(self, service: EngineService, max_body_bytes: int,
                 read_timeout_s: float = READ_TIMEOUT_S, allowed_hosts: tuple[str, ...] = ()):
        self.service = service
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.registry = registry_for(service)
        self._job_ids = itertools.count(1)

    @web.middleware
    async def errors(self, request: web.Request, handler):
        """Every error is JSON, OpenAI's shape plus llama-server's numeric `code`: ours, the
        router's 404/405, aiohttp's own refusals, and a bug's 500 (logged, never echoed)."""
        close = False
        try:
            return await handler(request)
        except ApiError as exc:
            status, message, kind, headers = exc.status, exc.message, exc.kind, exc.headers
            close = exc.close
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status, message, headers = exc.status, exc.reason, None
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            if exc.status == 404:
                message = f"no route {request.path} (see the README: HTTP FIM API)"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
                headers = {"Allow": exc.headers.get("Allow", "")}
        except Exception:  # noqa: BLE001 - a bug must still answer in JSON
            log.exception("HTTP %s %s failed", request.method, request.path)
            status, message, kind, headers = 500, "internal error (logged)", "server_error", None
        body = {"error": {"message": message, "type": kind, "code": status}}
        response = web.json_response(body, status=status, headers=headers)
        if close:
            response.force_close()
        return response

    @web.middleware
    async def host_guard(self, request: web.Request, handler):
        transport = request.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        if not host_is_this_loopback_server(request.headers.get("Host"), local, tls,
                                            self.allowed_hosts):
            raise _error(421, f"Host {request.headers.get('Host')!r} is not this loopback "
                         "server (send Host localhost or 127.0.0.1 with its port)", close=True)
        return await handler(request)

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if request.path != "/health":
            offered = request.headers.get("Authorization", "")
            scheme, _, token = offered.partition(" ")
            if scheme.lower() != "bearer" or not self.service.token_ok(token.strip()):
                # Closed after the answer: a caller without the token holds no connection.
                raise _error(401, "missing or wrong token (send "
                             "`Authorization: Bearer <token>`; the token is in the engine's "
                             "token file)", "authentication_error", close=True,
                             **{"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        s = self.service.scheduler
        body = {"status": "ok" if s.state == "ready" else s.state, "state": s.state}
        return web.json_response(body, status=200 if s.state == "ready" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=render(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise _error(413, f"body of {request.content_length} bytes is over the "
                         f"{self.max_body_bytes}-byte limit")
        try:  # aiohttp stops reading past client_max_size
            return await asyncio.wait_for(request.read(), self.read_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise _error(413, f"body is over the {self.max_body_bytes}-byte limit") from None
        except asyncio.TimeoutError:
            raise _error(408, f"the body did not arrive within {self.read_timeout_s:g} s",
                         close=True) from None

    async def fim(self, request: web.Request) -> web.StreamResponse:
        from engine.serve.peer_api import model_name, stream_completion, stream_drafts

        raw = await self.read_body(request)
        try:
            body = msgspec.json.decode(raw, type=FimRequest)
        except msgspec.DecodeError as exc:
            raise _error(400, f"bad request body: {exc}") from None
        stops = stop_strings(body.stop)
        scheduler = self.service.scheduler
        if scheduler.state != "ready":
            raise _error(503, f"the model is {scheduler.state}"
                         + (f": {scheduler.error}" if scheduler.error else ""), "server_error")
        name = body.model or model_name(scheduler.info)
        if body.stream and body.stream_drafts:
            return await stream_drafts(request, self, to_engine_request(body, stops), stops,
                                       name, usage=False, chat_delta=True)
        result = await self._run(request, to_engine_request(body, stops))
        answer = to_response(result, stops, name)
        if body.stream:  # Continue's OpenAI adapter always streams FIM
            return await stream_completion(request, answer, usage=False, chat_delta=True)
        return web.json_response(answer)

    async def _run(self, request: web.Request, engine_request: CompletionRequest,
                   on_draft=None):
        scheduler = self.service.scheduler
        info = scheduler.info
        try:  # at the door: nothing below sees a field it cannot carry (a 2**64 seed)
            validate(engine_request, info.max_context if info is not None else None)
        except EngineInputError as exc:
            scheduler.stats.record_outcome("rejected")
            raise _error(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        def reply(result, error) -> None:
            def settle() -> None:
                if not answer.done():
                    answer.set_result((result, error))
            loop.call_soon_threadsafe(settle)

        client = fairness_client(request)
        job = Job(client=client, id=next(self._job_ids), request=engine_request, reply=reply,
                  on_draft=on_draft)
        self.service.http_in_flight += 1
        self.service.touch()
        try:
            self.service.scheduler.submit(job)
            result, error = await answer
        except asyncio.CancelledError:  # the caller hung up: stop the model between steps
            self.service.scheduler.cancel(client, job.id)
            raise
        finally:
            self.service.http_in_flight -= 1
            self.service.touch()
        if error is not None:
            if error.startswith("bad completion request"):
                raise _error(400, error)
            raise _error(500, error, "server_error")
        if result is None:
            raise _error(503, "the request was dropped (engine shutting "
                         "down)", "server_error")
        # It never reached the model within the server's own deadline: the engine is busy. A
        # client's shorter budget (llama.vim's t_max_predict_ms) gets its empty "limit" answer.
        busy = engine_request.timeout_ms >= HTTP_TIMEOUT_MS
        if busy and result.stats.timed_out and not result.candidates:
            raise _error(503, "timed out waiting for the model (the engine is busy); retry "
                         "later", "server_error", **{"Retry-After": "1"})
        return result


def build_app(service: EngineService, max_body_bytes: int = 1024 * 1024,
              read_timeout_s: float = READ_TIMEOUT_S,
              allowed_hosts: tuple[str, ...] = ()) -> web.Application:
    api = FimApi(service, max_body_bytes, read_timeout_s, allowed_hosts)
    app = web.Application(client_max_size=max_body_bytes,
                          middlewares=[api.errors, api.host_guard, api.auth])
    app.router.add_post("/v1/fim/completions", api.fim)
    from engine.serve.peer_api import add_peer_routes  # (it imports this module)

    add_peer_routes(app, api)  # /v1/completions, /infill
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics)
    return app


class ConnectionCap:
    """The protocol factory of the HTTP listener: aiohttp's own handler for each connection
    while fewer than `limit` are open; past it a new connection is closed at once (and the
    refusal logged, throttled). Counted from `accept` on, TLS handshakes included."""

    def __init__(self, server: web.Server, limit: int, handshake_s: float | None):
        self.server, self.limit, self.handshake_s = server, limit, handshake_s
        self.open = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            return _Refuse(self)
        self.open += 1
        return _Counted(self, self.server())


class _Refuse(asyncio.Protocol):
    def __init__(self, cap: ConnectionCap):
        self.cap = cap

    def connection_made(self, transport) -> None:
        refused_log.warning("refused an HTTP connection from %s: %d are open (the cap)",
                            transport.get_extra_info("peername"), self.cap.limit)
        transport.abort()


class _Counted(asyncio.Protocol):
    """aiohttp's RequestHandler, counted until its connection is gone."""

    def __init__(self, cap: ConnectionCap, inner: asyncio.Protocol):
        self.cap, self.inner = cap, inner
        self.made = self.released = False
        if cap.handshake_s is not None:
            # A TLS handshake that fails or times out never reaches connection_made nor
            # connection_lost: release its place once the handshake deadline has passed.
            asyncio.get_running_loop().call_later(cap.handshake_s + 1.0, self._handshake_over)

    def _handshake_over(self) -> None:
        if not self.made:
            self._release()

    def _release(self) -> None:
        if not self.released:
            self.released = True
            self.cap.open -= 1

    def connection_made(self, transport) -> None:
        self.made = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._release()
        self.inner.connection_lost(exc)


class HttpServer:
    """The listener and aiohttp's runner, closed together (server.py's closers)."""

    def __init__(self, listener: asyncio.AbstractServer, runner: web.AppRunner):
        self.listener, self.runner = listener, runner

    async def cleanup(self) -> None:
        self.listener.close()
        await self.listener.wait_closed()
        await self.runner.cleanup()


async def start_http(service: EngineService, host: str, port: int, *, max_body_bytes: int,
                     read_timeout_s: float = READ_TIMEOUT_S,
                     max_connections: int = MAX_CONNECTIONS,
                     tls: ssl.SSLContext | None = None,
                     allowed_hosts: tuple[str, ...] = ()) -> tuple[HttpServer, str]:
    """Serve the app; returns the server (to clean up) and the base URL actually bound."""
    runner = web.AppRunner(build_app(service, max_body_bytes, read_timeout_s, allowed_hosts),
                           handler_cancellation=True, access_log=None,
                           keepalive_timeout=read_timeout_s, lingering_time=LINGER_S)
    await runner.setup()
    assert runner.server is not None
    cap = ConnectionCap(runner.server, connection_limit(max_connections),
                        read_timeout_s if tls is not None else None)
    try:
        listener = await asyncio.get_running_loop().create_server(
            cap, host, port, ssl=tls, backlog=ACCEPT_BACKLOG,
            ssl_handshake_timeout=read_timeout_s if tls is not None else None)
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = listener.sockets[0].getsockname()[:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    scheme = "https" if tls is not None else "http"
    return HttpServer(listener, runner), f"{scheme}://{bound_host}:{bound_port}"
