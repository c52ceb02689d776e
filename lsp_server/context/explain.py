"""`maskfill-lsp --explain-context`: what the server would send as extra context at a cursor,
with the files under --root as the workspace (the cursor's file and up to 19 more of its
language, newest first, as the open documents). Prints one line per snippet, then, last, one
JSON line: {"snippets": [{"path", "start_line", "end_line", "why", "text"}], "tokens", "ms"}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pygls.uris import from_fs_path

from lsp_server.context.gatherer import ContextGatherer, OpenFile, _language
from lsp_server.context.snippet import ContextBlock
from lsp_server.context.windows import MAX_FILES
from lsp_server.context.workspace_files import MAX_FILE_BYTES

# Default budget: what the server gives a model with a 4k+ window at default settings
# (snippet.extra_context_tokens(1024, 4096, 32, 4)); the embedded 384-token model gets 0.
DEFAULT_BUDGET = 256
MAX_SCANNED = 5000  # files looked at under the root, at most
SKIPPED_FOLDERS = frozenset({"node_modules", "__pycache__", "site-packages", "dist", "build"})



class ExplainError(Exception):
    """A bad argument: the message is one line for the user."""


def _open_documents(root: Path, current: Path, language: str) -> list[Path]:
    found: list[tuple[float, Path]] = []
    scanned = 0
    for folder, subfolders, names in os.walk(root, followlinks=False):
        subfolders[:] = sorted(
            d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS
        )
        for name in sorted(names):
            scanned += 1
            path = Path(folder) / name
            if path.is_symlink() or _language(None, path) != language or path == current:
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            if stat.st_size <= MAX_FILE_BYTES:
                found.append((stat.st_mtime, path))
        if scanned >= MAX_SCANNED:
            break
    found.sort(key=lambda item: (-item[0], str(item[1])))
    return [path for _, path in found[: MAX_FILES - 1]]


def explain(root: Path, file: Path, line: int, col: int, budget: int) -> ContextBlock:
    """The block at 1-based `line`, `col` (characters) of `file`, with `root` as the
    workspace folder."""
    root = root.resolve()
    if not root.is_dir():
        raise ExplainError(f"--root {root} is not a folder")
    file = (file if file.is_absolute() else Path.cwd() / file).resolve()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExplainError(f"cannot read --file {file}: {exc}") from None
    if budget < 0:
        raise ExplainError(f"--budget must be >= 0, got {budget}")
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise ExplainError(f"--line {line} is outside {file.name} (1..{len(lines)})")
    if not 1 <= col <= len(lines[line - 1]) + 1:
        raise ExplainError(f"--col {col} is outside line {line} (1..{len(lines[line - 1]) + 1})")
    offset = sum(len(text_line) + 1 for text_line in lines[: line - 1]) + col - 1
    language = _language(None, file)
    docs = [OpenFile(from_fs_path(str(file)), None, 1, text)]
    for path in _open_documents(root, file, language):
        try:
            text_of_path = path.read_text(encoding="utf-8")
            docs.append(OpenFile(from_fs_path(str(path)), None, 1, text_of_path))
        except (OSError, UnicodeDecodeError):
            continue
    gatherer = ContextGatherer([root], lambda: docs)
    for doc in reversed(docs):  # the cursor's file most recent, then newest first
        gatherer.opened(doc.uri)
    return gatherer.gather(docs[0].uri, text, offset, budget)


def main(root: str, file: str, line: int, col: int, budget: int | None) -> int:
    try:
        block = explain(Path(root), Path(file), line, col,
                        DEFAULT_BUDGET if budget is None else budget)
    except ExplainError as exc:
        print(f"maskfill-lsp: {exc}", file=sys.stderr)
        return 2
    for snippet in block.snippets:
        print(f"{snippet.path}:{snippet.start_line}-{snippet.end_line}  {snippet.why}  "
              f"~{snippet.tokens} tokens")
    print(block.to_json())
    return 0
