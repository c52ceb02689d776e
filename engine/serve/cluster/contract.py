"""The HTTP FIM contract as the cluster serves it: engine/serve/http_api.py's request and
answer (shared, not copied), plus what only a cluster needs: the session key a router sticks
on, a seed fixed before the first try (so a retry of a sampled request gives the answer the
first try would have), and the typed messages between the ingress and an engine replica."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets

import msgspec

from engine.api import CompletionRequest, CompletionResult, Draft
from engine.serve.fim_wire import ApiError, FimRequest

FIM_PATH = "/v1/fim/completions"
MODELS_PATH = "/v1/models"
SESSION_HEADER = "x-session-id"  # Serve's own session header (RAY_SERVE_SESSION_ID_HEADER_KEY)
MAX_SESSION_CHARS = 512


class ClusterFimRequest(FimRequest, kw_only=True):
    """The FIM body plus `session`, for clients (or proxies) that cannot send a header."""

    session: str | None = None


class EngineCall(msgspec.Struct, kw_only=True, frozen=True):
    """Ingress -> engine replica."""

    request: CompletionRequest
    client: int  # the scheduler's fairness unit: one per session
    # The peer routes' span ceiling is half the model's window, which only the replica knows.
    fit_window: bool = False


class EngineAnswer(msgspec.Struct, kw_only=True):
    """Engine replica -> ingress: the scheduler's (result, error) and who answered."""

    result: CompletionResult | None
    error: str | None
    model: str  # the answering checkpoint's name as the HTTP API echoes it (peer_api.model_name)
    replica: str
    engine_ms: float  # time in the replica, queue included


class StreamPart(msgspec.Struct, kw_only=True):
    """Engine replica -> ingress, one per item of a streamed call (`stream_drafts`): partial
    fills while the model denoises, then the answer."""

    draft: Draft | None = None
    answer: EngineAnswer | None = None
    model: str = ""  # as in EngineAnswer, on every part: a draft event names the model too
    replica: str = ""


def pin_request_seed(request: CompletionRequest) -> CompletionRequest:
    """pin_seed for a request built from a peer route's body."""
    sampled = request.temperature > 0 or request.num_candidates > 1
    if sampled and request.seed is None:
        return dataclasses.replace(request, seed=secrets.randbits(31))
    return request


def token_digest(token: str) -> bytes:
    """What the ingress keeps of the Bearer token: a digest, so the secret itself never sits in
    the cluster's deployment config."""
    return hashlib.sha256(token.encode()).digest()


def token_ok(digest: bytes, offered: str) -> bool:
    try:  # a header's undecodable bytes arrive as lone surrogates: not the token (issue 20.8)
        mine = token_digest(offered)
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(mine, digest)


def decode_body(raw: bytes) -> ClusterFimRequest:
    try:
        body = msgspec.json.decode(raw, type=ClusterFimRequest)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"bad request body: {exc}") from None
    if body.session is not None and len(body.session) > MAX_SESSION_CHARS:
        raise ApiError(400, f"session: at most {MAX_SESSION_CHARS} characters")
    return body


def session_key(digest: bytes, session: str | None) -> str | None:
    """The routing key of an editing session: (token, client's session id) hashed, so two
    teams' sessions never collide and no document name reaches Serve's logs."""
    if not session:
        return None
    if len(session) > MAX_SESSION_CHARS:
        raise ApiError(400, f"{SESSION_HEADER}: at most {MAX_SESSION_CHARS} characters")
    return hashlib.blake2b(session.encode(), key=digest[:32], digest_size=12).hexdigest()


def scheduler_client(key: str | None) -> int:
    """A negative client id per session (socket clients are positive): the replica's
    scheduler takes turns between sessions, so one busy document cannot starve the others."""
    return -1 - (int(key[:8], 16) if key else 0)


def pin_seed(body: ClusterFimRequest) -> ClusterFimRequest:
    """A sampled request without a seed gets one now: its retry draws the same answer."""
    sampled = body.temperature > 0 or body.n > 1
    if sampled and body.seed is None:
        return msgspec.structs.replace(body, seed=secrets.randbits(31))
    return body
