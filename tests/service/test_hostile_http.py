"""The engine's HTTP surface under attack (issue 20 part B), each case against a real
`maskfill-engine serve` process: idle and half-sent connections, a connection flood under a low
file limit, refused callers kept from holding connections, folders named for a token or a
socket left as they are, unencodable tokens, throttled refusal logs, TLS, the loopback Host
check and fair turns per HTTP session."""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp  # noqa: F401 - the HTTP API's package: without it these tests are skipped
import pytest

from engine.serve.client import EngineConnection
from tests.fixtures.certificates import self_signed
from tests.service.conftest import (
    STOP_WAIT_S,
    ServedEngine,
    connect_unix,
    memorized_hole,
    wait_http_ready,
)

HANG_S = 60.0  # hang guards only: every wait below ends far sooner when things work
LOAD_S = 180.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX sockets and modes")


# -- helpers ---------------------------------------------------------------------------------


def token_of(engine: ServedEngine) -> str:
    return Path(engine.endpoints["token_file"]).read_text().strip()


def address(engine: ServedEngine) -> tuple[str, int]:
    host, _, port = engine.endpoints["http"].rpartition("//")[2].rpartition(":")
    return host.strip("[]"), int(port)


def request(engine: ServedEngine, method: str, path: str, body: dict | None = None, *,
            headers: dict | None = None, context: ssl.SSLContext | None = None,
            ) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request on a fresh connection."""
    host, port = address(engine)
    connection = (http.client.HTTPSConnection(host, port, timeout=HANG_S, context=context)
                  if context is not None else http.client.HTTPConnection(host, port,
                                                                        timeout=HANG_S))
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers=headers or {})
        answer = connection.getresponse()
        raw = answer.read()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, json.loads(raw)
    finally:
        connection.close()


def wait_healthy(engine: ServedEngine, context: ssl.SSLContext | None = None) -> None:
    wait_http_ready(engine.endpoints["http"], context, LOAD_S)


def fim_body(model: Path) -> tuple[dict, str]:
    hole, middle = memorized_hole(model)
    return {"prompt": hole.prefix, "suffix": hole.suffix, "max_tokens": hole.max_tokens}, middle


def closed_by_server(sock: socket.socket, seconds: float = HANG_S) -> bytes:
    """Read until the server closes the connection; what it sent before. Fails (the hang
    guard) if it is still open after `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {seconds:.0f} s "
                    f"(it sent {received[:200]!r})")
    return received


def start_engine(model: Path, *args: str, files: int | None = None) -> ServedEngine:
    """`maskfill-engine serve`, optionally under a file limit (soft and hard) of `files`."""

    def limit() -> None:
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--model", str(model), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    line = process.stdout.readline()
    if not line:
        process.wait(STOP_WAIT_S)
        raise AssertionError(f"engine did not start: {process.stderr.read()}")
    return ServedEngine(process, json.loads(line))


@pytest.fixture
def engines(runtime_dir):
    """start(model, *args, files=None) -> ServedEngine; stopped (and its pipes closed) after."""
    started: list[ServedEngine] = []

    def start(model: Path, *args: str, files: int | None = None) -> ServedEngine:
        engine = start_engine(model, *args, files=files)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()
        for stream in (engine.process.stdout, engine.process.stderr):
            stream.close()


def stderr_after_stop(engine: ServedEngine) -> str:
    engine.stop()
    return engine.process.stderr.read()


# -- 20.6: idle, half-sent and refused connections ---------------------------------------------


def test_idle_and_half_sent_connections_are_closed(memorized_model, engines):
    """Silent connections, half a request head, and half a body (with the token) are each
    closed at the read timeout (default 15 s); they used to stay open for good."""
    engine = engines(memorized_model, "--no-socket", "--http", "127.0.0.1:0")
    host, port = address(engine)
    wait_healthy(engine)
    silent = [socket.create_connection((host, port)) for _ in range(3)]
    half_head = [socket.create_connection((host, port)) for _ in range(3)]
    for sock in half_head:
        sock.sendall(b"POST /v1/fim/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    half_body = socket.create_connection((host, port))
    half_body.sendall(f"POST /v1/fim/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {token_of(engine)}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                      '{"prompt": "'.encode())
    try:
        for sock in silent + half_head:
            assert closed_by_server(sock) == b""
        answer = closed_by_server(half_body).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive" in answer, answer
    finally:
        for sock in [*silent, *half_head, half_body]:
            sock.close()


def test_a_refused_caller_holds_no_connection(memorized_model, engines):
    """A request without the token is answered 401 and its connection closed: no keep-alive
    for a stranger to sit on (it used to stay open, ready for the next try)."""
    engine = engines(memorized_model, "--no-socket", "--http", "127.0.0.1:0")
    host, port = address(engine)
    body = b'{"prompt": "x"}'
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"POST /v1/fim/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        answer = closed_by_server(sock, seconds=30).decode()
    assert answer.startswith("HTTP/1.1 401") and "Connection: close" in answer, answer


def test_an_http_flood_under_a_low_file_limit_leaves_the_unix_socket_answering(
        memorized_model, engines, runtime_dir):
    """200 idle HTTP connections against an engine whose file limit is 100: the connection
    cap keeps descriptors for the editors' Unix socket, which answers throughout, and the HTTP
    API serves again once the flood is gone. Before, accept() failed for every listener and the
    idle connections were never closed: the Unix socket stayed dead."""
    sock_path = runtime_dir / "e.sock"
    engine = engines(memorized_model, "--socket", str(sock_path), "--http", "127.0.0.1:0",
                     files=100)
    host, port = address(engine)
    wait_healthy(engine)
    flood = []
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):  # a refused one may be reset while connecting
                flood.append(socket.create_connection((host, port), timeout=HANG_S))
        time.sleep(0.5)  # let the engine accept (and refuse) what it will
        editor = connect_unix(sock_path)
        try:
            assert editor.status().state == "ready"
            request_, middle = memorized_hole(memorized_model)
            assert editor.complete(request_).text == middle
        finally:
            editor.close()
    finally:
        for sock in flood:
            sock.close()
    body, middle = fim_body(memorized_model)
    status, _, answer = request(engine, "POST", "/v1/fim/completions", body,
                                headers={"Authorization": f"Bearer {token_of(engine)}"})
    assert status == 200 and answer["choices"][0]["text"] == middle, answer
    log = stderr_after_stop(engine)
    refusals = log.count("refused an HTTP connection")
    assert 1 <= refusals <= 5 and "more HTTP connections refused" in log, log


# -- 20.7: folders named for a token file or a socket ------------------------------------------


def test_named_folders_are_never_chmodded_and_unsafe_ones_refused(memorized_model, engines,
                                                                  tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    engine = engines(memorized_model, "--socket", str(shared / "e.sock"), "--http",
                     "127.0.0.1:0", "--token-file", str(home / ".maskfill-token"))
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # the README's example: home untouched
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # /tmp keeps its sticky bit
    assert stat.S_IMODE((home / ".maskfill-token").stat().st_mode) == 0o600
    assert stat.S_IMODE((shared / "e.sock").stat().st_mode) == 0o600
    engine.stop()

    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)  # anyone could swap our socket or token here
    for flag, name in (("--token-file", "token"), ("--socket", "e.sock")):
        extra = ["--http", "127.0.0.1:0"] if flag == "--token-file" else []
        result = subprocess.run(
            [sys.executable, "-m", "engine", "serve", "--model", str(memorized_model),
             *(["--no-socket"] if flag == "--token-file" else []), *extra,
             flag, str(open_folder / name)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "writable by others without the sticky bit" in result.stderr, result.stderr
        assert stat.S_IMODE(open_folder.stat().st_mode) == 0o777

    made = tmp_path / "new" / "deeper"  # what maskfill creates itself is private
    engine = engines(memorized_model, "--no-socket", "--http", "127.0.0.1:0", "--token-file",
                     str(made / "token"))
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700


# -- 20.8: unencodable tokens ----------------------------------------------------------------


def test_an_unencodable_bearer_token_gets_401(memorized_model, engines):
    engine = engines(memorized_model, "--no-socket", "--http", "127.0.0.1:0")
    host, port = address(engine)
    for token in (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"):  # bytes no UTF-8 decoder takes
        with socket.create_connection((host, port)) as sock:
            sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
                         + b"Authorization: Bearer " + token + b"\r\n\r\n")
            answer = closed_by_server(sock, seconds=30).decode("utf-8", "replace")
        assert answer.startswith("HTTP/1.1 401"), answer
        assert "authentication_error" in answer
    assert "Traceback" not in stderr_after_stop(engine)


def test_lsp_tcp_answers_an_unencodable_token_with_an_error(tmp_path):
    from tests.e2e.raw_client import Server, connect, free_port

    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("editor-secret\n")
    token_file.chmod(0o600)
    server = Server(["--tcp", f"127.0.0.1:{port}", "--token-file", str(token_file), "--model",
                     str(tmp_path / "none")], tmp_path / "stderr.log")
    try:
        sock, client = connect(port)
        with sock:
            body = (b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": '
                    b'{"processId": null, "rootUri": null, "capabilities": {}, '
                    b'"initializationOptions": {"token": "\\ud800"}}}')
            client.send_bytes(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            reply = client.response(1)
            assert reply["error"]["code"] == -32600 and "token" in reply["error"]["message"]
            client.wait_closed()
        sock, editor = connect(port)  # the server lives on for the editor
        with sock:
            editor.initialize(settings={"token": "editor-secret"})
            assert editor.call("shutdown")["result"] is None
            editor.notify("exit")
        assert server.wait_exit() == 0
    finally:
        server.stop()


# -- 20.10: refusals are logged throttled ------------------------------------------------------


def test_refused_connections_are_logged_throttled(memorized_model, engines):
    """300 connections with a wrong token: a few lines and one count, not 300 lines."""
    from engine.api import EngineError

    engine = engines(memorized_model, "--no-socket", "--tcp", "127.0.0.1:0")
    host, _, port = engine.endpoints["tcp"].rpartition(":")
    refused = 0
    for _ in range(300):
        try:
            EngineConnection.tcp(host, int(port), token="not-the-token", name="intruder")
        except EngineError as exc:
            assert "wrong token" in str(exc)
            refused += 1
    assert refused == 300
    log = stderr_after_stop(engine)
    lines = log.count("connection refused: missing or wrong token")
    assert 1 <= lines <= 10, log
    counted = [line for line in log.splitlines() if "more connections refused" in line]
    told = sum(int(line.split(": ", 1)[1].split()[0]) for line in counted)
    assert lines + told == 300, log


# -- TLS, --insecure-http, the loopback Host ---------------------------------------------------


def test_https_with_tls_cert_and_key(memorized_model, engines, tmp_path):
    cert, key = self_signed(tmp_path)
    engine = engines(memorized_model, "--no-socket", "--http", "127.0.0.1:0", "--tls-cert",
                     str(cert), "--tls-key", str(key))
    assert engine.endpoints["http"].startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(cert))
    wait_healthy(engine, context)
    body, middle = fim_body(memorized_model)
    status, _, answer = request(engine, "POST", "/v1/fim/completions", body, context=context,
                                headers={"Authorization": f"Bearer {token_of(engine)}"})
    assert status == 200 and answer["choices"][0]["text"] == middle, answer
    with pytest.raises((http.client.HTTPException, OSError)):  # plain HTTP gets nothing
        request(engine, "GET", "/health")


def test_a_remote_http_address_needs_tls_or_insecure_http(memorized_model, engines):
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(memorized_model),
         "--no-socket", "--http", "0.0.0.0:0", "--allow-remote"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--tls-cert" in result.stderr and "--insecure-http" in result.stderr
    engine = engines(memorized_model, "--no-socket", "--http", "0.0.0.0:0", "--allow-remote",
                     "--insecure-http")
    assert engine.endpoints["http"].startswith("http://0.0.0.0:")


def test_a_loopback_server_answers_only_a_loopback_host(memorized_model, engines):
    """DNS rebinding: a web page's name pointed at 127.0.0.1 must not reach the API."""
    engine = engines(memorized_model, "--no-socket", "--http", "127.0.0.1:0",
                     "--allowed-host", "proxy.example")
    _, port = address(engine)
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.nip.io:{port}",
                 "127.0.0.1:1"):
        status, headers, body = request(engine, "GET", "/health", headers={"Host": host})
        assert status == 421 and "not this loopback server" in body["error"]["message"], host
        assert headers.get("connection") == "close"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}",
                 f"[::1]:{port}", "proxy.example"):  # the last one: --allowed-host
        status, _, body = request(engine, "GET", "/health", headers={"Host": host})
        assert status in (200, 503) and "state" in body, (host, body)


# -- fair turns per HTTP session -------------------------------------------------------------


def test_http_sessions_take_turns(slow_model, engines, runtime_dir):
    """Three long requests of session A are queued, then one of session B, all from one host:
    B runs second (its own turn), not after all of A (one turn per address)."""
    sock_path = runtime_dir / "e.sock"
    engine = engines(slow_model, "--socket", str(sock_path), "--http", "127.0.0.1:0",
                     "--max-in-flight", "1", "--cache-size", "0")
    wait_healthy(engine)
    watcher = connect_unix(sock_path)
    token = token_of(engine)
    finished: list[str] = []
    lock = threading.Lock()

    def post(name: str, session: str, index: int) -> None:
        body = {"prompt": f"def f{index}(x):\n", "suffix": "\n", "max_tokens": 128}
        status, _, answer = request(engine, "POST", "/v1/fim/completions", body, headers={
            "Authorization": f"Bearer {token}", "X-Session": session})
        assert status == 200, answer
        with lock:
            finished.append(name)

    threads = []
    try:
        for index in range(3):
            threads.append(threading.Thread(target=post, args=(f"a{index}", "a", index)))
            threads[-1].start()
        deadline = time.monotonic() + HANG_S
        while watcher.status().stats["queueDepth"] < 3:
            assert time.monotonic() < deadline and not finished, finished
            time.sleep(0.02)
        threads.append(threading.Thread(target=post, args=("b", "b", 9)))
        threads[-1].start()
        for thread in threads:
            thread.join(LOAD_S)
    finally:
        watcher.close()
    assert len(finished) == 4, finished
    assert finished.index("b") < 3, finished  # not behind every one of A's
