"""Context gatherer (issue 23): windows of open files, definitions of imported names, recent
edits, within a token and a time budget, kept stable across keystrokes. See gatherer.py."""

from lsp_server.context.gatherer import ContextGatherer, OpenDocument, OpenFile, StableContext
from lsp_server.context.snippet import ContextBlock, Snippet, extra_context_tokens

__all__ = [
    "ContextBlock", "ContextGatherer", "OpenDocument", "OpenFile", "Snippet", "StableContext",
    "extra_context_tokens",
]
