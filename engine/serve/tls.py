"""TLS for the engine's network listeners and for the blocking `tls://` client (issue 20).

The server side is one context from PEM files, shared by `--http` (HTTPS) and `--tcp` (the
msgpack protocol over TLS). The client side verifies the engine's certificate against the
system's CAs, or a CA file for a self-signed engine, and checks the host name; its failures
are told in words a user can act on (EngineTlsError). `TlsChannel` runs TLS over a blocking
socket through memory buffers, so that the client's reader thread and its sending threads
never use one OpenSSL object at the same time (OpenSSL does not allow that). Torch- and
aiohttp-free.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading

from engine.api import EngineError, EngineUnavailable
from engine.serve.protocol import HEADER_BYTES, FrameError, Refused, decode_server, frame_length
from engine.serve.wrapped_socket import WrappedSocket

READ_CHUNK = 64 * 1024
# The first bytes of a TLS record: content type (alert 21, handshake 22), then major version 3.
TLS_RECORD_TYPES = (0x15, 0x16)


class EngineTlsError(EngineUnavailable):
    """The TLS session with an engine could not be set up (a certificate not trusted, a name
    that does not match, a peer that does not speak TLS): a retry, at any span, would fail the
    same way, so a request answers nothing and is not tried again."""


def server_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    """A server context (TLS 1.2+, the ssl module's defaults) from PEM files; a clear error
    for a missing file, a wrong key or a password-protected key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        raise EngineError(f"cannot use --tls-cert {cert} with --tls-key {key}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


def client_context(ca_file: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A client context that checks the engine's certificate and host name: against the
    system's CAs, or only `ca_file` (PEM: a self-signed engine's own certificate, or the CA
    that signed it) when given."""
    if ca_file is None:
        return ssl.create_default_context()
    path = os.path.expanduser(os.fspath(ca_file))
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise EngineError(f"engineCaFile {path} cannot be used as a CA file: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def looks_like_tls(data: bytes) -> bool:
    """Whether `data` starts like a TLS record (a plain client reading a TLS server's alert)."""
    return len(data) >= 2 and data[0] in TLS_RECORD_TYPES and data[1] == 3


def handshake_failure(exc: BaseException, where: str, answer: bytes = b"") -> EngineTlsError:
    """What to tell the user when the TLS handshake with the engine at `where` failed; `answer`:
    the first bytes the engine sent (a plain engine's refusal frame says why it closed)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if "hostname" in reason.lower() or "mismatch" in reason.lower():
            return EngineTlsError(
                f"the engine at {where} has a certificate for another name ({reason}): "
                "connect with a name or address the certificate lists")
        return EngineTlsError(
            f"the engine at {where} has a certificate this client does not trust ({reason}): "
            "for a self-signed engine, set engineCaFile to its certificate (or to the CA that "
            "signed it)")
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    refusal = _refusal_in(answer)
    if refusal is not None:
        reason = f"it answered in plain TCP: {refusal}"
    return EngineTlsError(
        f"no TLS session with the engine at {where} ({reason}): if it serves plain TCP (no "
        "--tls-cert), use tcp://HOST:PORT")


def _refusal_in(answer: bytes) -> str | None:
    """The message of a plain Refused frame at the start of `answer`, if it holds one."""
    if len(answer) < HEADER_BYTES:
        return None
    try:
        length = frame_length(answer[:HEADER_BYTES])
        message = decode_server(answer[HEADER_BYTES:HEADER_BYTES + length])
    except FrameError:
        return None
    return message.message if isinstance(message, Refused) else None


class TlsChannel(WrappedSocket):
    """A TLS client session over a connected blocking socket, with the few socket methods the
    engine client uses (recv, sendall, settimeout, setsockopt, shutdown, close).

    One thread reads (recv) while others send (sendall, under the caller's own send lock):
    the OpenSSL object is only touched under `_lock`, and whoever drains its outgoing bytes
    sends them before anyone drains more (`_wire_lock`), so records reach the wire in order."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str):
        self._sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing,
                                     server_hostname=server_hostname)
        self._lock = threading.Lock()  # the SSLObject and its buffers
        self._wire_lock = threading.Lock()  # outgoing records, drained and sent in order
        self._plain = bytearray()  # decrypted bytes not yet handed to the reader
        self.first_answer = b""  # the engine's first bytes (handshake_failure reads them)

    def handshake(self) -> None:
        """Run the handshake; ssl.SSLError, OSError or ConnectionError when it fails. The
        socket bounds each wait (the client's DeadlineSocket: one deadline for the whole
        set-up); a TimeoutError from it is passed on as it is."""
        try:
            self._handshake()
        except (ConnectionResetError, BrokenPipeError) as exc:
            # a peer that closed before reading our hello resets the connection instead of
            # ending it: the same failure as an empty answer
            raise ConnectionError("the engine closed the connection during the TLS "
                                  "handshake") from exc

    def _handshake(self) -> None:
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                data = self._sock.recv(READ_CHUNK)
                if not data:
                    raise ConnectionError("the engine closed the connection during the TLS "
                                          "handshake") from None
                self.first_answer = self.first_answer or data
                with self._lock:
                    self._incoming.write(data)
            except ssl.SSLError:
                self._flush()  # our alert, so the engine's log can say why
                raise

    def recv(self, n: int) -> bytes:
        """Up to `n` decrypted bytes; b"" once the engine has closed the session."""
        while not self._plain:
            with self._lock:
                try:
                    chunk = self._tls.read(READ_CHUNK)
                except ssl.SSLWantReadError:
                    chunk = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    chunk = b""
                produced = self._outgoing.pending > 0  # e.g. an answer to a key update
            if produced:
                self._flush()
            if chunk == b"":
                return b""
            if chunk:
                self._plain += chunk
                break
            data = self._sock.recv(READ_CHUNK)
            with self._lock:
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
        out = bytes(self._plain[:n])
        del self._plain[:n]
        return out

    def sendall(self, data: bytes) -> None:
        with self._wire_lock:
            with self._lock:
                view = memoryview(data)
                while view:  # a memory BIO takes it all; the loop is for a partial write
                    view = view[self._tls.write(view):]
                wire = self._outgoing.read()
            self._sock.sendall(wire)

    def _flush(self) -> None:
        with self._wire_lock:
            with self._lock:
                wire = self._outgoing.read()
            if wire:
                self._sock.sendall(wire)

