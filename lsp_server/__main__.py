"""`maskfill-lsp`: serve over stdio (default) or a loopback TCP port; `--check` checks the install.

stdout carries the protocol and nothing else: the process's own file descriptor 1 is pointed at
stderr before anything loads, so a stray print (or a native library's) cannot corrupt it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import get_args

from engine.api import EngineError, QuantMode

LOOPBACK_NAMES = {"localhost"}
SWITCH_INTERVAL_S = 0.0005
# After `exit`: how long the engine thread may take to free the model. Freeing a loaded model
# takes milliseconds; a load in progress cannot be interrupted and is not waited for.
EXIT_WAIT_S = 0.3

log = logging.getLogger("lsp_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="maskfill-lsp", description="maskfill language server (inline code completion)"
    )
    parser.add_argument("--version", action="version", version=f"maskfill-lsp {version()}")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check this install for --model/--device/--quant (torch build, CUDA, xformers, "
        "quant kernels, model, memory fit), print one line per finding and exit: 1 if something "
        "needed is broken",
    )
    explain = parser.add_argument_group(
        "context", "print what the server would send as extra context at a cursor, then exit"
    )
    explain.add_argument("--explain-context", action="store_true",
                         help="needs --root, --file, --line and --col; last line: JSON")
    explain.add_argument("--root", help="the workspace folder")
    explain.add_argument("--file", help="the file the cursor is in")
    explain.add_argument("--line", type=int, help="the cursor's line (1-based)")
    explain.add_argument("--col", type=int, help="the cursor's column (1-based, characters)")
    explain.add_argument("--budget", type=int, help="extra-context tokens (default 256: a "
                         "4k-window model's share; the embedded model's is 0)")
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument("--stdio", action="store_true", help="serve over stdin/stdout (default)")
    transport.add_argument("--tcp", metavar="HOST:PORT", help="serve one client on a loopback port")
    parser.add_argument(
        "--token-file",
        help="--tcp: the token a client must send as initializationOptions.token (default: the "
        "shared engine's token file in the runtime folder, created 0600 when missing)",
    )
    parser.add_argument("--log-file", help="write logs here instead of stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    parser.add_argument(
        "--model", help="checkpoint folder or HF cache repo id (overrides settings)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (overrides settings)")
    parser.add_argument("--quant", choices=get_args(QuantMode), help="weight quantization")
    parser.add_argument(
        "--parent-poll-ms",
        type=float,
        default=1000.0,
        help="how often to check that the editor process (LSP processId) is alive",
    )
    return parser.parse_args(argv)


def version() -> str:
    from lsp_server.tools.doctor import maskfill_version  # imports no torch

    return maskfill_version()


def loopback_address(value: str) -> tuple[str, int]:
    """Parse HOST:PORT and refuse anything but a loopback host (a client also needs the token)."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--tcp expects HOST:PORT, got {value!r}")
    if host not in LOOPBACK_NAMES:
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError
        except ValueError:
            raise ValueError(f"--tcp host must be a loopback address, got {host!r}") from None
    return host, int(port_text)


def configure_logging(verbosity: int, log_file: str | None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
        if log_file
        else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING - 10 * min(verbosity, 2))
    # pygls logs every message body at INFO: only at -vv, it costs milliseconds per request.
    logging.getLogger("pygls").setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)


def tcp_token(token_file: str | None) -> str:
    """The token a TCP client must present: the one the shared engine uses unless told.
    Any local process can connect to a loopback port; only this user can read the token."""
    from engine.serve.paths import TOKEN_FILE_NAME, ensure_token, read_token, runtime_dir

    if token_file:
        return read_token(Path(token_file).expanduser())
    return ensure_token(runtime_dir() / TOKEN_FILE_NAME)


def start_profile():
    """(profiler, file): a cProfile of the event loop's thread while serving, to be written to
    $MASKFILL_PROFILE at the end (lsp_server.tools.bench --profile); None when it is unset."""
    from lsp_server.request_timing import PROFILE_ENV

    path = os.environ.get(PROFILE_ENV)
    if not path:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler, path


def main(argv: list[str] | None = None) -> int:
    """Serve, then end the process (os._exit) with the LSP exit code; returns only on a
    command-line error."""
    args = parse_args(argv)
    if args.explain_context:
        missing = [f"--{k}" for k in ("root", "file", "line", "col") if getattr(args, k) is None]
        if missing:
            print(f"maskfill-lsp: --explain-context needs {', '.join(missing)}", file=sys.stderr)
            return 2
        from lsp_server.context.explain import main as explain

        return explain(args.root, args.file, args.line, args.col, args.budget)
    if args.check:
        from lsp_server.tools.doctor import main as check

        return check(model=args.model, device=args.device, quant=args.quant)
    configure_logging(args.verbose, args.log_file)
    tcp = token = None
    if args.tcp:
        try:
            tcp = loopback_address(args.tcp)
            token = tcp_token(args.token_file)
        except (ValueError, EngineError) as exc:
            print(f"maskfill-lsp: {exc}", file=sys.stderr)
            return 2
    overrides = {k: getattr(args, k) for k in ("model", "device", "quant") if getattr(args, k)}
    # Idle OpenMP threads of a CPU torch build spin for milliseconds after each kernel; on a
    # busy machine they starve both the event loop and the engine itself. Set before the
    # worker thread imports torch; an explicit user setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The engine thread runs Python between kernels; with the default 5 ms GIL switch interval
    # the event loop can wait that long to answer or read the next message.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    from lsp_server import transport
    from lsp_server.server import create_server

    server = create_server(overrides=overrides, parent_poll_s=args.parent_poll_ms / 1000)
    profile = start_profile()
    if tcp is not None:
        transport.serve_tcp(server, *tcp, token=token)
    else:
        protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = sys.stderr
        transport.serve_stdio(server, sys.stdin.buffer, protocol_out)
    if profile is not None:
        profile[0].disable()
        profile[0].dump_stats(profile[1])
    code = server.exit_code()
    server.free(timeout=EXIT_WAIT_S)
    if server.worker.state != "closed":  # a model load cannot be interrupted
        log.info("exiting with the engine still %s; the OS frees it", server.worker.state)
    logging.shutdown()
    sys.stderr.flush()
    # Not sys.exit: interpreter teardown would wait for, or run finalizers under, an engine
    # thread that may be inside a model load (editors restart servers on settings changes
    # and expect them gone at once). Everything worth keeping is flushed above.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
