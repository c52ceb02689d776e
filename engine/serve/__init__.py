"""The shared engine process: one resident model for every editor window, plus an HTTP FIM API.

`maskfill-engine serve` owns the model. Language servers reach it over a per-user Unix socket
(protocol.py, client.py), other tools over HTTP (http_api.py). Nothing here imports LSP code.
"""
