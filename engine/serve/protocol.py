"""Wire messages between engine clients and `maskfill-engine serve`.

Each message is one frame: a 4-byte big-endian length, then a msgpack-encoded tagged msgspec
Struct. Requests carry an `id` chosen by the client; every reply names the id it answers, so
one connection can have several requests in flight (complete, then cancel, then status).
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from engine.api import CompletionRequest, CompletionResult, EngineInfo

PROTOCOL_VERSION = 1
# Messages past version 1's that this engine serves, named in its Welcome. An engine of an
# older install refuses a message it does not know and closes the connection (decode_client:
# FrameError), so a client sends one only when the Welcome names it; the version stays 1,
# because a Welcome's unknown field is ignored by an older client and an older Welcome has
# no capabilities.
CAPABILITIES = ("prewarm",)
# A completion request carries at most a few hundred KB of context; anything far larger is a
# broken or hostile peer, refused before its body is read.
MAX_FRAME_BYTES = 8 * 1024 * 1024
_HEADER = struct.Struct(">I")


class Hello(msgspec.Struct, tag="hello", kw_only=True):
    """First message of a connection. `token` is required on TCP, ignored on a Unix socket."""

    version: int = PROTOCOL_VERSION
    client: str = ""  # a name for logs and status, e.g. "maskfill-lsp 12345"
    token: str | None = None


class Complete(msgspec.Struct, tag="complete", kw_only=True):
    id: int
    request: CompletionRequest
    # Newest wins per key: a new request with the same (connection, key) drops or stops the
    # older one, as the in-process worker does per document. "" opts out.
    key: str = ""


class Cancel(msgspec.Struct, tag="cancel", kw_only=True):
    id: int  # the Complete to stop (pending: dropped; running: stopped between steps)


class StatusQuery(msgspec.Struct, tag="status", kw_only=True):
    id: int


class Prewarm(msgspec.Struct, tag="prewarm", kw_only=True):
    """Fire and forget: encode `request`'s context into the engine's cache when it is idle
    (no denoising, no reply), so the next request sharing its start is warm (a new
    extra-context block, issue 23). Only to an engine whose Welcome names "prewarm"."""

    request: CompletionRequest


ClientMessage = Hello | Complete | Cancel | StatusQuery | Prewarm


class Welcome(msgspec.Struct, tag="welcome", kw_only=True):
    version: int
    pid: int
    state: str  # loading | ready | failed
    error: str | None = None
    capabilities: tuple[str, ...] = ()  # CAPABILITIES of the engine (none: an older one)


class Result(msgspec.Struct, tag="result", kw_only=True):
    id: int
    result: CompletionResult | None = None  # None: dropped (cancelled or superseded) unrun
    error: str | None = None  # one line, when the engine failed on this request


class StatusReply(msgspec.Struct, tag="status_reply", kw_only=True):
    id: int
    state: str
    error: str | None
    info: EngineInfo | None
    stats: dict[str, Any]


class Refused(msgspec.Struct, tag="refused", kw_only=True):
    """Sent before closing a connection the engine will not serve (bad token, bad version)."""

    message: str


ServerMessage = Welcome | Result | StatusReply | Refused


class FrameError(Exception):
    """A frame that is too large or does not decode: the connection is closed."""


_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)


def encode(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    return length


HEADER_BYTES = _HEADER.size


def decode_client(body: bytes) -> ClientMessage:
    try:
        return _client_decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise FrameError(f"bad message: {exc}") from None


def decode_server(body: bytes) -> ServerMessage:
    try:
        return _server_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(f"bad message: {exc}") from None
