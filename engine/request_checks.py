"""The checks every completion request passes before any layer acts on it.

Dataclasses check nothing on creation, and msgspec decodes the wire's integers as big as the
encoding allows (JSON: any size; msgpack: up to 2**64 - 1), so a request may carry a seed no
generator takes or a max_tokens beyond the window. The engine's boundaries (the socket server
and the HTTP API, engine/serve/) run `validate` on what they decode and refuse with the
message, naming the field, before the request is queued or cached; Engine.complete runs it
again for in-process callers. Torch-free: the service imports it before any model is loaded.
"""

from __future__ import annotations

import math

from engine.api import CompletionRequest, EngineInputError

SAMPLERS = ("threshold", "entropy_bounded", "origin", "maskgit_plus", "topk_margin", "entropy",
            "low_confidence")
STOP_MODES = ("line", "block", "expr", "free")
MAX_CANDIDATES = 16
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def validate(request: CompletionRequest, max_context: int | None) -> None:
    """Refuse nonsense with one clear line (dataclasses do not check types on creation).
    max_context None: the model's window is not known yet (the engine checks it again)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise EngineInputError(f"bad completion request: {message}")

    def is_int(value) -> bool:  # and one msgpack and torch carry: a signed 64-bit integer
        return isinstance(value, int) and not isinstance(value, bool) and \
            INT64_MIN <= value <= INT64_MAX

    def is_num(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
            value
        )

    need(isinstance(request.prefix, str) and isinstance(request.suffix, str),
         "prefix and suffix must be strings")
    need(is_int(request.max_tokens) and request.max_tokens >= 1,
         f"max_tokens must be a positive integer, got {request.max_tokens!r}")
    need(max_context is None or request.max_tokens < max_context,
         f"max_tokens={request.max_tokens} does not fit the model window of {max_context} tokens")
    if request.span_lengths is not None:
        need(len(request.span_lengths) > 0 and all(
            is_int(n) and 1 <= n <= request.max_tokens for n in request.span_lengths),
            f"span_lengths must be integers in 1..max_tokens, got {request.span_lengths!r}")
    need(request.stop in STOP_MODES, f"stop must be one of {STOP_MODES}, got {request.stop!r}")
    need(request.sampler in SAMPLERS,
         f"sampler must be one of {SAMPLERS}, got {request.sampler!r}")
    need(is_num(request.threshold) and 0 < request.threshold <= 1,
         f"threshold must be in (0, 1], got {request.threshold!r}")
    need(is_num(request.entropy_bound) and request.entropy_bound > 0,
         f"entropy_bound must be positive, got {request.entropy_bound!r}")
    need(request.steps is None or (is_int(request.steps) and request.steps >= 1),
         f"steps must be a positive integer or None, got {request.steps!r}")
    need(is_num(request.temperature) and request.temperature >= 0,
         f"temperature must be >= 0, got {request.temperature!r}")
    need(is_num(request.top_p) and 0 < request.top_p <= 1,
         f"top_p must be in (0, 1], got {request.top_p!r}")
    need(request.seed is None or is_int(request.seed),
         f"seed must be an integer in {INT64_MIN}..{INT64_MAX} or None, got {request.seed!r}")
    need(is_int(request.num_candidates) and 1 <= request.num_candidates <= MAX_CANDIDATES,
         f"num_candidates must be in 1..{MAX_CANDIDATES}, got {request.num_candidates!r}")
    need(is_int(request.cache_refresh_every) and request.cache_refresh_every >= 0,
         f"cache_refresh_every must be >= 0, got {request.cache_refresh_every!r}")
    need(request.max_context_tokens is None or (
        is_int(request.max_context_tokens) and request.max_context_tokens > request.max_tokens),
        f"max_context_tokens must exceed max_tokens, got {request.max_context_tokens!r}")
    need(request.timeout_ms is None or (is_num(request.timeout_ms) and request.timeout_ms > 0),
         f"timeout_ms must be positive or None, got {request.timeout_ms!r}")
