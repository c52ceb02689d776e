"""Where a request's extra context (other files' code) goes in the prompt.

With the tokenizer's repository tokens (Qwen2.5-Coder's `<|file_sep|>`, which llama.cpp calls
FIM_SEP; Dream-Coder and DreamOn inherit the Qwen2.5 tokenizer) each chunk is
`<|file_sep|>PATH\\nTEXT\\n`, and one more `<|file_sep|>` opens the current file. The token is
looked up by name in the checkpoint's tokenizer, never by id. Without it, each chunk is a
comment block, Copilot's layout: `# Compare this snippet from PATH:` and the chunk's lines,
commented with the marker of the chunk's language.

The chunks come highest priority first; those that do not fit their room (at most half the
window's context budget; the file's own text takes the rest) are dropped from the end, whole:
a chunk cut in the middle would change with every budget and break the K/V reuse of the
prompt's start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

from engine.api import ContextChunk

FILE_SEP_TOKEN = "<|file_sep|>"  # by name, looked up in the tokenizer's vocabulary
HASH_COMMENT = frozenset({".py", ".pyi", ".rb", ".sh", ".bash", ".r", ".pl", ".toml", ".yaml",
                          ".yml", ".jl", ".ex", ".exs", ".nim"})
DASH_COMMENT = frozenset({".sql", ".lua", ".hs"})


def comment_marker(path: str) -> str:
    suffix = PurePosixPath(path.replace("\\", "/")).suffix.lower()
    if suffix in HASH_COMMENT:
        return "#"
    if suffix in DASH_COMMENT:
        return "--"
    return "//"


def comment_block(chunk: ContextChunk) -> str:
    marker = comment_marker(chunk.path)
    lines = [f"{marker} Compare this snippet from {chunk.path}:"]
    lines += [f"{marker} {line}".rstrip() for line in chunk.text.split("\n")]
    return "\n".join(lines) + "\n"


def file_sep_id(tokenizer) -> int | None:
    """The id of `<|file_sep|>` in the tokenizer, or None when it has no such token."""
    backend = getattr(tokenizer, "backend", None)
    lookup = getattr(backend, "token_to_id", None)
    return lookup(FILE_SEP_TOKEN) if lookup is not None else None


def extra_ids(tokenizer, extra: Sequence[ContextChunk], room: int) -> list[int]:
    """Token ids of the chunks that fit `room` tokens, in order (see the module doc)."""
    if not extra or room <= 0:
        return []
    sep = file_sep_id(tokenizer)
    closing = [sep] if sep is not None else []
    out: list[int] = []
    for chunk in extra:
        if sep is not None:
            ids = [sep, *tokenizer.encode(f"{chunk.path}\n{chunk.text}\n")]
        else:
            ids = tokenizer.encode(comment_block(chunk))
        if len(out) + len(ids) + len(closing) > room:
            break
        out += ids
    return out + closing if out else []
