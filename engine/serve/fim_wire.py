"""The HTTP FIM API's wire shapes: the request body, its errors, the engine request it becomes and
the answer. Shared by http_api.py, peer_api.py and the cluster front, so none of them imports
another for these.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any

import msgspec

from engine.api import CompletionRequest, CompletionResult, ContextChunk

HTTP_TIMEOUT_MS = 30_000.0  # the engine's deadline for one HTTP request


MAX_STOP_SEQUENCES = 8


MAX_N = 8
MAX_EXTRA_CHUNKS = 64  # as /infill's input_extra


class FimExtra(msgspec.Struct, kw_only=True):
    """A chunk of another file's code (issue 23): `path` (or llama-server's `filename`)."""

    text: str
    path: str = ""
    filename: str = ""


class FimRequest(msgspec.Struct, kw_only=True):
    """Fields other OpenAI-style clients send (user, stream=false, echo, ...) are ignored."""

    prompt: str
    suffix: str = ""
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=512)] = 64
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    stop: str | list[str] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    stream: bool = False
    # With stream: the partial fills as the model denoises, before the answer (peer_api).
    stream_drafts: bool = False
    # Other files' code, laid out before the prompt by the engine (engine/denoise/repo_context.py).
    extra: Annotated[list[FimExtra], msgspec.Meta(max_length=MAX_EXTRA_CHUNKS)] = \
        msgspec.field(default_factory=list)


class ApiError(Exception):
    """Answered by the middleware as {"error": {"message", "type"}}, OpenAI style."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, *, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers
        self.close = close  # answer, then close the connection (no keep-alive for strangers)


def _error(status: int, message: str, kind: str = "invalid_request_error", *,
           close: bool = False, **headers: str) -> ApiError:
    return ApiError(status, message, kind, headers or None, close=close)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > MAX_STOP_SEQUENCES:
        raise _error(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences")
    if any(not s for s in strings):
        raise _error(400, "stop: sequences must not be empty")
    return strings


def to_engine_request(body: FimRequest, stops: list[str]) -> CompletionRequest:
    # A newline stop is the engine's own line mode (shorter holes, fewer passes); any other
    # stop string is applied to the text afterwards.
    return CompletionRequest(
        prefix=body.prompt, suffix=body.suffix, max_tokens=body.max_tokens,
        stop="line" if "\n" in stops else "free", temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, num_candidates=body.n, timeout_ms=HTTP_TIMEOUT_MS,
        extra=tuple(ContextChunk(c.path or c.filename, c.text) for c in body.extra),
    )


def cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def to_response(result: CompletionResult, stops: list[str], model: str) -> dict[str, Any]:
    choices = []
    for index, candidate in enumerate(result.candidates):
        text, stopped = cut_at_stops(candidate.text, stops)
        ended = stopped or (candidate.ended and not result.stats.timed_out)
        choices.append({"index": index, "text": text, "logprobs": None,
                        "finish_reason": "stop" if ended else "length"})
    s = result.stats
    prompt_tokens = s.prefix_tokens + s.suffix_tokens
    return {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        # completion_tokens: what the model wrote for the top choice (the engine does not
        # count tokens per extra candidate).
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": s.model_tokens,
                  "total_tokens": prompt_tokens + s.model_tokens},
    }
