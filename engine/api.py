"""Typed boundary between the engine and its callers (CLI, LSP server, bench, eval).

Everything here is a stdlib dataclass: msgspec encodes and decodes dataclasses as it does
Structs (the same msgpack/JSON bytes, field by field in order), so the wire is unchanged, while
the engine and its GPU entry points import with only torch and the model libraries installed
(a lent GPU machine has no msgspec; design/gpu-runbook.md). Copy with `dataclasses.replace`.
The engine never imports LSP code; the server never builds tensors. Cancellation (a
threading.Event) is passed beside the request, not inside it, because it cannot be serialised.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal, Protocol

StopMode = Literal["line", "block", "expr", "free"]
SamplerName = Literal[
    "threshold",  # fast default: commit every masked slot with confidence >= tau (>= 1 per step)
    "entropy_bounded",  # EB-Sampler: lowest-entropy slots while summed entropy <= gamma
    "origin",  # Dream reference samplers (models.md 5.1) ...
    "maskgit_plus",
    "topk_margin",
    "entropy",
    "low_confidence",  # LLaDA reference remasking (models.md 5.2)
]
QuantMode = Literal["none", "int8", "int4", "fp8"]


@dataclass(frozen=True)
class ContextChunk:
    """Code from another file the prompt carries before the current file's text (issue 23):
    `path` as the user knows it (relative to the workspace), `text` the lines themselves."""

    path: str
    text: str


@dataclass(kw_only=True, frozen=True)
class CompletionRequest:
    """One fill-in-the-middle job: text before and after the cursor plus decoding knobs."""

    prefix: str
    suffix: str
    max_tokens: int = 64  # span budget: the longest hole tried, in tokens
    span_lengths: tuple[int, ...] | None = None  # None: the engine picks buckets <= max_tokens
    stop: StopMode = "block"
    sampler: SamplerName = "threshold"
    threshold: float = 0.9  # tau for "threshold"
    entropy_bound: float = 0.15  # gamma for "entropy_bounded"
    steps: int | None = None  # reference samplers: steps per hole (None: one per masked token)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    num_candidates: int = 1  # >1: distinct candidates sampled in one batch (manual trigger)
    use_cache: bool = True  # dual context cache within the request
    cache_refresh_every: int = 0  # re-encode the whole context every N steps (0: never)
    max_context_tokens: int | None = None  # None: the model's trained window
    timeout_ms: float | None = None  # deadline relative to the call's start
    # True: `candidates` holds every distinct row (each hole length, each sample), ranked, not
    # only the best num_candidates; the LSP server re-ranks them by syntax (issue 23).
    all_rows: bool = False
    # Other files' code, laid out before the prefix (engine/denoise/repo_context.py), highest
    # priority first; it shares the window (max_context_tokens) with the file's own text,
    # which keeps what it needs first. Keep it byte-identical between keystrokes: the K/V
    # reuse matches the context from its start.
    extra: tuple[ContextChunk, ...] = ()


@dataclass(kw_only=True, frozen=True)
class Candidate:
    text: str
    mean_confidence: float  # mean probability of the committed tokens
    span_length: int  # hole length (tokens) this candidate came from
    ended: bool  # an end token closed the span before its last slot


@dataclass(kw_only=True)
class CompletionStats:
    forward_passes: int = 0
    # slots filled per step, including EOS written by the pad-to-the-right rule (padded_tokens)
    tokens_committed_per_step: list[int] = field(default_factory=list)
    padded_tokens: int = 0  # of those, end tokens the rule wrote rather than the model
    # milliseconds per phase: tokenize, encode, denoise, decode, total
    timings_ms: dict[str, float] = field(default_factory=dict)
    mean_confidence: float = 0.0
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    span_length: int = 0
    cancelled: bool = False
    timed_out: bool = False
    # context tokens whose K/V came from an earlier request (engine/denoise/context_cache.py); 0:
    # cold
    reused_context_tokens: int = 0
    speculative_hit: bool = False  # they came from a context prepared "as if accepted"
    batch_rows: int = 0  # most rows in a pass this request shared (its own included)

    @property
    def committed_tokens(self) -> int:
        return sum(self.tokens_committed_per_step)

    @property
    def model_tokens(self) -> int:
        """Tokens the model itself chose: the honest denominator of passes per token."""
        return self.committed_tokens - self.padded_tokens


@dataclass(kw_only=True)
class CompletionResult:
    text: str  # best candidate after stop-mode trimming ("" when cancelled)
    candidates: list[Candidate]
    stats: CompletionStats


@dataclass(kw_only=True, frozen=True)
class Draft:
    """A partial fill while the hole is being denoised (Engine.complete's `on_draft`): the row
    of the first candidate with the longest hole, at one of the loop's host reads. Slots the
    model committed never change afterwards, so successive drafts only grow."""

    step: int  # denoising steps done
    text: str  # the committed run from the hole's first slot to its first masked slot (or end)
    fill: str  # the whole row so far, each still-masked slot shown as DRAFT_MASK
    masked: int  # slots still masked
    slots: int  # the row's hole length


DRAFT_MASK = "\u2591"  # a still-masked slot in Draft.fill


@dataclass(kw_only=True, frozen=True)
class EngineInfo:
    model: str  # what the user asked for (path or repo id)
    path: str  # resolved checkpoint folder
    family: str  # "dream" | "llada"
    device: str
    dtype: str
    quant: QuantMode
    weight_bytes: int  # resident parameter + buffer bytes
    parameters: int
    max_context: int
    load_ms: float


class EngineError(Exception):
    """A user-facing failure: the message is one clear line, fit to print without a traceback."""


class EngineInputError(EngineError):
    """The request itself cannot be served (text the tokenizer refuses, a hole or context that
    does not fit the window): another device or a retry would not help."""


class EngineUnavailable(EngineError):
    """The engine cannot answer now for a reason a shorter span would not fix (it is silent
    past the request's deadline, or restarting): the caller answers nothing and does not retry."""


class EngineAuthError(EngineUnavailable):
    """The engine refused our credential (HTTP 401/403): no retry can succeed until the token
    changes, so the user is told once rather than every keystroke."""


class EngineLike(Protocol):
    """What a caller needs from an engine: engine.engine.Engine in process, or a client of one
    in another process (the shared engine's socket, an HTTP FIM endpoint)."""

    def complete(
        self, request: CompletionRequest, cancel: threading.Event | None = None
    ) -> CompletionResult: ...

    def info(self) -> EngineInfo: ...

    def close(self) -> None: ...

    @property
    def concurrent_calls(self) -> bool:
        """Whether calls from several threads at once are worth making: the engine shares
        passes between them or serves each on its own. False: callers send one at a time
        (the engine stays correct either way)."""
        ...


def one_line(error: BaseException, limit: int | None = None, *, with_type: bool = False) -> str:
    """An exception as one line for a log or a message: its text with every run of whitespace
    (newlines too) made one space, cut to `limit` characters; its type's name when it has none.
    `with_type`: the type's name goes first ("ImportError: ..."), for a report that says what
    failed to someone who did not see the traceback (the doctor)."""
    text = " ".join(str(error).split())
    text = text[:limit] if limit is not None else text
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type else text
