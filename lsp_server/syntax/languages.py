"""Which tree-sitter grammar parses which document (LSP languageId or file name).

Grammars come from their PyPI wheels and load lazily, once per process. A language with no
grammar (or one that fails to load) gets None: the caller keeps today's rule-based stops, and
the failure is logged once, not per request.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import PurePath

log = logging.getLogger(__name__)

# grammar name -> (module, function returning the language pointer)
_GRAMMARS: dict[str, tuple[str, str]] = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
}

# LSP languageIds (VS Code's and Neovim's names) -> grammar name
LANGUAGE_IDS: dict[str, str] = {
    "python": "python",
    "javascript": "javascript",
    "javascriptreact": "javascript",  # the JavaScript grammar parses JSX
    "typescript": "typescript",
    "typescriptreact": "tsx",
    "go": "go",
    "rust": "rust",
    "java": "java",
    "c": "c",
    "cpp": "cpp",
    "cuda-cpp": "cpp",
}

EXTENSIONS: dict[str, str] = {
    ".py": "python", ".pyi": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp",
}

_lock = threading.Lock()
_loaded: dict[str, object | None] = {}  # grammar name -> tree_sitter.Language or None


def grammar_for(language_id: str | None = None, path: str | None = None) -> str | None:
    """The grammar name for an LSP languageId, else for a file name's extension; None: none."""
    if language_id and language_id in LANGUAGE_IDS:
        return LANGUAGE_IDS[language_id]
    if path:
        return EXTENSIONS.get(PurePath(path).suffix.lower())
    return None


def load_language(grammar: str | None):
    """The tree_sitter.Language for `grammar`, or None (unknown, not installed, or broken)."""
    if grammar is None or grammar not in _GRAMMARS:
        return None
    with _lock:
        if grammar in _loaded:
            return _loaded[grammar]
        language = None
        try:
            from tree_sitter import Language

            module_name, function = _GRAMMARS[grammar]
            module = importlib.import_module(module_name)
            language = Language(getattr(module, function)())
        except Exception as exc:  # ImportError, an ABI the binding refuses, ...
            log.warning("no syntax support for %s (rule-based stops kept): %s", grammar, exc)
        _loaded[grammar] = language
        return language


def new_parser(grammar: str | None):
    """A fresh tree_sitter.Parser for `grammar` (parsers are not shared between threads)."""
    language = load_language(grammar)
    if language is None:
        return None
    from tree_sitter import Parser

    return Parser(language)


def supported() -> list[str]:
    """Grammar names that load in this install."""
    return [name for name in _GRAMMARS if load_language(name) is not None]
