"""maskfill language server: inline completions over LSP."""
