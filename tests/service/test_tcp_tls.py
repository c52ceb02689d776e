"""TLS on the engine's `--tcp` listener and on the language server's `tls://` client (issue 20's
follow-up), each through the real processes: a real `maskfill-engine serve --tcp` with a
self-signed certificate made here, the real `maskfill-lsp` (or the LSP's own connect function)
against it, on the tiny memorized checkpoint. Deadlines are hang guards only."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.api import EngineError
from engine.serve.client import EngineConnection
from engine.serve.tls import EngineTlsError, client_context
from lsp_server.engine_client import _connect_endpoint
from tests.e2e.server_session import VSCODE, inline, open_document, start, status, stop, wait_ready
from tests.fixtures.certificates import self_signed
from tests.fixtures.memorized import SNIPPETS
from tests.service.conftest import STOP_WAIT_S, ServedEngine, wait_http_ready

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX sockets and modes")

TOKEN = "tls-token"
LOAD_S = 180.0  # hang guard for the model load
PREFIX = "def is_even(n):\n"
BODY = next(s for s in SNIPPETS if s.startswith(PREFIX))[len(PREFIX):].rstrip("\n")
HANDSHAKE_FAILED = "the TLS handshake failed"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path / "engine-cert")


def tcp_engine(serve_engine, model: Path, token_file: Path,
               certificate: tuple[Path, Path] | None) -> ServedEngine:
    tls = ["--tls-cert", str(certificate[0]), "--tls-key", str(certificate[1])] if certificate \
        else []
    return serve_engine(model, "--no-socket", "--tcp", "127.0.0.1:0", "--token-file",
                        str(token_file), *tls)


def port_of(engine: ServedEngine) -> int:
    return int(engine.endpoints["tcp"].rpartition(":")[2])


def wait_loaded(port: int, token: str, tls=None) -> None:
    deadline = time.monotonic() + LOAD_S
    connection = EngineConnection.tcp("127.0.0.1", port, token=token, name="probe", tls=tls)
    try:
        while connection.status().state != "ready":
            assert time.monotonic() < deadline, "the engine did not load its model"
            time.sleep(0.1)
    finally:
        connection.close()


def shared_settings(endpoint: str, token_file: Path, **extra) -> dict:
    return {"engineMode": "shared", "engineEndpoint": endpoint,
            "engineTokenFile": str(token_file), "timeoutMs": 120_000, **extra}


def stderr_after_stop(engine: ServedEngine) -> str:
    engine.stop()
    return engine.process.stderr.read()


async def test_an_lsp_completes_through_a_tls_engine_with_the_ca_file(
        serve_engine, memorized_model, token_file, certificate):
    engine = tcp_engine(serve_engine, memorized_model, token_file, certificate)
    port = port_of(engine)
    assert engine.endpoints["tcp_url"] == f"tls://127.0.0.1:{port}"
    client, _ = await start(None, VSCODE, settings=shared_settings(
        f"tls://localhost:{port}", token_file, engineCaFile=str(certificate[0])))
    try:
        ready = await wait_ready(client, LOAD_S)
        assert ready["loadState"] == "ready" and ready["engineMode"] == "shared", ready
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        items = await inline(client, uri, 1, 0)
        assert BODY in [item.insert_text for item in items]
    finally:
        await stop(client)
    assert HANDSHAKE_FAILED not in stderr_after_stop(engine)


async def test_a_certificate_the_lsp_does_not_trust_is_said_once_and_not_retried(
        serve_engine, memorized_model, token_file, certificate, tmp_path):
    engine = tcp_engine(serve_engine, memorized_model, token_file, certificate)
    port = port_of(engine)
    wait_loaded(port, TOKEN, client_context(certificate[0]))
    other_ca, _ = self_signed(tmp_path / "other-ca")  # same names, another key
    client, _ = await start(None, VSCODE, settings=shared_settings(
        f"tls://127.0.0.1:{port}", token_file, engineCaFile=str(other_ca)))
    try:
        failed = await wait_ready(client, LOAD_S)
        assert failed["loadState"] == "failed", failed
        assert "does not trust" in failed["error"] and "engineCaFile" in failed["error"], failed
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        for _ in range(2):  # answered (nothing), no crash, no new connection attempt
            assert await inline(client, uri, 1, 0) == []
        after = await status(client)
        assert after["loadState"] == "failed" and after["modelRuns"] == 0, after
        told = [m.message for m in client.messages if "does not trust" in m.message]
        assert len(told) == 1, [m.message for m in client.messages]
    finally:
        await stop(client)
    # The engine saw one refused handshake (the load), not a loop of retries.
    assert stderr_after_stop(engine).count(HANDSHAKE_FAILED) == 1


def test_a_certificate_for_another_name_is_refused(serve_engine, memorized_model, token_file,
                                                   tmp_path):
    cert, key = self_signed(tmp_path / "elsewhere", ("engine.example",))
    engine = tcp_engine(serve_engine, memorized_model, token_file, (cert, key))
    with pytest.raises(EngineTlsError, match="another name"):
        _connect_endpoint(f"tls://127.0.0.1:{port_of(engine)}", str(token_file), str(cert))


def test_plain_and_tls_clients_meeting_the_other_kind_get_clear_errors(
        serve_engine, memorized_model, token_file, certificate):
    tls_engine = tcp_engine(serve_engine, memorized_model, token_file, certificate)
    plain_engine = tcp_engine(serve_engine, memorized_model, token_file, None)
    tls_port, plain_port = port_of(tls_engine), port_of(plain_engine)
    assert plain_engine.endpoints["tcp_url"] == f"tcp://127.0.0.1:{plain_port}"
    with pytest.raises(EngineError, match="tls://HOST:PORT"):
        _connect_endpoint(f"tcp://127.0.0.1:{tls_port}", str(token_file))
    with pytest.raises(EngineTlsError, match="answered in plain TCP.*tcp://HOST:PORT"):
        _connect_endpoint(f"tls://127.0.0.1:{plain_port}", str(token_file),
                          str(certificate[0]))
    # Both engines still serve the right kind of client.
    wait_loaded(tls_port, TOKEN, client_context(certificate[0]))
    wait_loaded(plain_port, TOKEN)
    assert HANDSHAKE_FAILED in stderr_after_stop(tls_engine)


def test_a_tls_client_past_the_connection_cap_is_told_why(serve_engine, memorized_model,
                                                           token_file, certificate):
    engine = serve_engine(memorized_model, "--no-socket", "--tcp", "127.0.0.1:0",
                          "--token-file", str(token_file), "--tcp-max-connections", "1",
                          "--tls-cert", str(certificate[0]), "--tls-key", str(certificate[1]))
    context = client_context(certificate[0])
    held = EngineConnection.tcp("127.0.0.1", port_of(engine), token=TOKEN, name="held",
                                tls=context)
    try:
        with pytest.raises(EngineTlsError, match="too many connections"):
            EngineConnection.tcp("127.0.0.1", port_of(engine), token=TOKEN, name="second",
                                 tls=context)
        assert held.status().state in ("loading", "ready")  # the held one is still served
    finally:
        held.close()


HELLO_LIMIT_S = 4.0  # the engine's --hello-timeout-s here (10 s by default)
HANDSHAKE_AFTER_S = 3.0  # a slow TLS client: its handshake starts this long after connecting


def seconds_until_dropped(port: int, context=None, handshake_after_s: float = 0.0) -> float:
    """Connect and never say hello (with `context`: do the TLS handshake after
    `handshake_after_s` first); the seconds from connecting until the engine drops us."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=LOAD_S)  # a hang guard
    try:
        if context is not None:
            time.sleep(handshake_after_s)
            try:
                sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
            except (OSError, ssl.SSLError):  # dropped during the handshake: dropped too
                return time.monotonic() - started
        with contextlib.suppress(OSError, ssl.SSLError):
            while sock.recv(4096):
                pass
        return time.monotonic() - started
    finally:
        sock.close()


def test_a_silent_tls_client_is_dropped_by_the_same_deadline_as_a_silent_plain_one(
        serve_engine, memorized_model, token_file, certificate):
    """The real engine drops a silent client, plain or slow to shake hands over TLS, and not
    before the limit. No upper bound: the model loads in the same process and a loaded machine
    may be late by seconds. That the hello gets only what the handshake left of the limit is
    tests/service/test_hello_deadline.py's, in process and load-proof."""
    engine = serve_engine(memorized_model, "--no-socket", "--tcp", "127.0.0.1:0",
                          "--token-file", str(token_file), "--hello-timeout-s",
                          str(HELLO_LIMIT_S), "--tls-cert", str(certificate[0]),
                          "--tls-key", str(certificate[1]))
    port, context = port_of(engine), client_context(certificate[0])
    dropped: dict[str, float] = {}
    clients = {"no handshake": lambda: seconds_until_dropped(port),
               "slow handshake": lambda: seconds_until_dropped(port, context,
                                                               HANDSHAKE_AFTER_S)}
    threads = [threading.Thread(target=lambda n=n, f=f: dropped.__setitem__(n, f()))
               for n, f in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_S)
    assert set(dropped) == set(clients), dropped
    assert all(s > HELLO_LIMIT_S - 0.1 for s in dropped.values()), dropped


def start_refused(model: Path, *args: str) -> subprocess.CompletedProcess:
    """An engine that must refuse to start: its exit, or the endpoints line it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--model", str(model), "--no-socket", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # the endpoints line: it started after all
    finally:
        if process.poll() is None:
            process.terminate()
        code = process.wait(STOP_WAIT_S)
        stderr = process.stderr.read()
        process.stdout.close()
        process.stderr.close()
    return subprocess.CompletedProcess(process.args, code, line, stderr)


def test_a_remote_tcp_address_needs_tls_or_insecure_tcp(serve_engine, memorized_model,
                                                        token_file, certificate, tmp_path):
    refused = start_refused(memorized_model, "--tcp", "0.0.0.0:0", "--allow-remote",
                            "--token-file", str(token_file))
    assert refused.stdout == "" and refused.returncode == 2, refused
    assert "--tls-cert" in refused.stderr and "--insecure-tcp" in refused.stderr
    missing = start_refused(memorized_model, "--tcp", "127.0.0.1:0", "--token-file",
                            str(token_file), "--tls-cert", str(tmp_path / "none.pem"),
                            "--tls-key", str(tmp_path / "none.key"))
    assert missing.stdout == "" and missing.returncode == 2, missing
    assert "cannot use --tls-cert" in missing.stderr and "none.pem" in missing.stderr
    insecure = serve_engine(memorized_model, "--no-socket", "--tcp", "0.0.0.0:0",
                            "--allow-remote", "--insecure-tcp", "--token-file", str(token_file))
    assert insecure.endpoints["tcp_url"].startswith("tcp://0.0.0.0:")
    secure = serve_engine(memorized_model, "--no-socket", "--tcp", "0.0.0.0:0",
                          "--allow-remote", "--token-file", str(token_file),
                          "--tls-cert", str(certificate[0]), "--tls-key", str(certificate[1]))
    assert secure.endpoints["tcp_url"].startswith("tls://0.0.0.0:")
    wait_loaded(port_of(secure), TOKEN, client_context(certificate[0]))


async def test_remote_mode_checks_an_https_engine_against_the_ca_file(
        serve_engine, memorized_model, token_file, certificate):
    pytest.importorskip("aiohttp")  # the HTTP API's package
    engine = serve_engine(memorized_model, "--no-socket", "--http", "127.0.0.1:0",
                          "--token-file", str(token_file), "--tls-cert", str(certificate[0]),
                          "--tls-key", str(certificate[1]))
    url = engine.endpoints["http"].replace("127.0.0.1", "localhost")
    wait_http_ready(url, client_context(certificate[0]), LOAD_S)
    client, _ = await start(None, VSCODE, settings={
        "engineMode": "remote", "engineEndpoint": url, "engineTokenFile": str(token_file),
        "engineCaFile": str(certificate[0]), "timeoutMs": 120_000})
    try:
        assert (await wait_ready(client, LOAD_S))["loadState"] == "ready"
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        assert BODY in [item.insert_text for item in await inline(client, uri, 1, 0)]
    finally:
        await stop(client)


def _close_at_once(conn: socket.socket) -> None:
    conn.close()


def _close_with_the_hello_unread(conn: socket.socket) -> None:
    """Close once the client's hello has arrived, unread: the client's socket is reset."""
    select.select([conn], [], [], 10)
    conn.close()


@pytest.mark.parametrize("close", [_close_at_once, _close_with_the_hello_unread],
                         ids=["at-once", "hello-unread"])
def test_a_tls_client_whose_peer_closes_at_once_gets_a_clear_error(token_file, certificate,
                                                                   close):
    """Not an engine at all (or one that drops the connection): a clear EngineTlsError, not a
    decoding error from the empty answer nor a bare reset (which one comes depends on timing)."""
    listener = socket.create_server(("127.0.0.1", 0))
    closer = threading.Thread(target=lambda: close(listener.accept()[0]), daemon=True)
    closer.start()
    try:
        with pytest.raises(EngineTlsError, match="closed the connection during the TLS"):
            _connect_endpoint(f"tls://127.0.0.1:{listener.getsockname()[1]}", str(token_file),
                              str(certificate[0]))
    finally:
        closer.join(10)
        listener.close()
