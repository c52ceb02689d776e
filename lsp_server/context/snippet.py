"""What the context gatherer hands on: snippets of other code, with where they came from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from engine.api import ContextChunk
from lsp_server.documents import CHARS_PER_TOKEN

SNIPPET_OVERHEAD_TOKENS = 8  # the path line and separators a layout adds around each snippet


@dataclass(frozen=True)
class Snippet:
    """`text` from `path` (relative to its workspace folder, "/"-separated), lines
    `start_line`..`end_line` (1-based, inclusive; a signature snippet may skip lines between);
    `why`: "import:NAME", "window:SCORE" or "recent_edit"."""

    path: str
    text: str
    start_line: int
    end_line: int
    why: str

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.text) + SNIPPET_OVERHEAD_TOKENS


@dataclass(frozen=True)
class ContextBlock:
    """The extra context for one request: `snippets` in prompt order, their estimated
    `tokens`, and the `ms` it took to gather them (0 when a stable block was reused)."""

    snippets: tuple[Snippet, ...] = ()
    tokens: int = 0
    ms: float = 0.0

    def chunks(self) -> tuple[ContextChunk, ...]:
        """What of the block reaches the prompt: each snippet's path and text (a request's
        `extra`). Two blocks with the same chunks are the same to the engine."""
        return tuple(ContextChunk(s.path, s.text) for s in self.snippets)

    def to_json(self) -> str:
        """One JSON line, as `maskfill-lsp --explain-context` prints it."""
        return json.dumps(
            {
                "snippets": [
                    {k: asdict(s)[k] for k in ("path", "start_line", "end_line", "why", "text")}
                    for s in self.snippets
                ],
                "tokens": self.tokens,
                "ms": round(self.ms, 3),
            },
            ensure_ascii=False,
        )


def estimate_tokens(text: str) -> int:
    """Tokens of `text` without the model's tokenizer (the server has none): the same
    characters-per-token bound the context window uses (lsp_server/documents.py)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def extra_context_tokens(
    context_tokens: int, model_window: int | None, max_tokens: int, rows: int
) -> int:
    """The default `extraContextTokens`: a quarter of the file context's budget, within what
    the model's window leaves after the file context and the hole rows; 0 when the window is
    under 1024 tokens (the embedded 384-token model has no room for it)."""
    if model_window is None or model_window < 1024:
        return 0
    room = model_window - context_tokens - max_tokens * rows
    return max(0, min(context_tokens // 4, room))
