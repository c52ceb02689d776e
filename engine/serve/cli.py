"""`maskfill-engine serve`: arguments and start-up of the shared engine process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import get_args

from engine.api import EngineError, QuantMode
from engine.serve import paths
from engine.serve.setup_deadline import HELLO_TIMEOUT_S
from engine.setup.extras import install_hint

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
FILE_LIMIT = 65536  # the soft limit raised towards this (the hard one permitting)

log = logging.getLogger(__name__)


def add_serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve", help="keep one model resident for every editor window (and HTTP clients)",
        description="Serve completions from one resident model over a private Unix socket "
        "(what maskfill-lsp connects to), optionally over TCP and an HTTP FIM API. "
        "TCP and HTTP need the token in --token-file; off loopback they need TLS "
        "(--tls-cert/--tls-key).")
    s.add_argument("--model", default=None, help="checkpoint folder or Hugging Face repo id "
                   "(local cache only); default: the embedded model")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    s.add_argument("--quant", default="none", choices=get_args(QuantMode))
    s.add_argument("--socket", type=Path, default=None, help="Unix socket path (default: "
                   "engine-<key>.sock in the per-user runtime folder)")
    s.add_argument("--no-socket", action="store_true", help="serve no Unix socket")
    s.add_argument("--lock", type=Path, default=None, help=argparse.SUPPRESS)
    s.add_argument("--tcp", metavar="HOST:PORT", help="also serve the socket protocol on TCP "
                   "(TLS with --tls-cert/--tls-key: clients connect to tls://HOST:PORT)")
    s.add_argument("--http", metavar="HOST:PORT", help="serve the HTTP FIM API, /health and "
                   "/metrics (needs aiohttp and prometheus-client: "
                   f"`{install_hint('serve')}`)".replace("%", "%%"))
    s.add_argument("--token-file", type=Path, default=None, help="token for TCP and HTTP "
                   "clients; created (0600) when missing, its folder too (0700); an existing "
                   "folder is never changed, and refused if others could replace files in it "
                   "(default: <runtime folder>/token)")
    s.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --tcp/--http address (clients need the token; "
                   "a remote --tcp/--http needs --tls-cert/--tls-key, or --insecure-tcp/"
                   "--insecure-http)")
    s.add_argument("--tls-cert", type=Path, default=None,
                   help="serve --http over HTTPS and --tcp over TLS with this PEM certificate "
                   "(chain)")
    s.add_argument("--tls-key", type=Path, default=None, help="the PEM private key of --tls-cert")
    s.add_argument("--insecure-http", action="store_true",
                   help="serve a remote --http without TLS: the token crosses the network in "
                   "clear")
    s.add_argument("--insecure-tcp", action="store_true",
                   help="serve a remote --tcp without TLS: the token and the code cross the "
                   "network in clear")
    s.add_argument("--http-read-timeout-s", type=float, default=15.0,
                   help="seconds an HTTP connection may take to send a request head, or a body, "
                   "or stay idle between requests (default 15)")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="on a loopback --http, also answer requests whose Host is NAME (a "
                   "reverse proxy that passes its own Host on); others get 421 (DNS rebinding)")
    s.add_argument("--http-max-connections", type=int, default=128,
                   help="open HTTP connections at most, fewer if the file limit is low "
                   "(default 128); further ones are closed at once")
    s.add_argument("--hello-timeout-s", type=float, default=HELLO_TIMEOUT_S,
                   help="seconds a socket or --tcp client has, from being accepted, to say hello "
                   "(a TLS handshake included; on Python 3.10 the handshake has its own limit "
                   f"of as long); silent ones are closed (default {HELLO_TIMEOUT_S:g})")
    s.add_argument("--tcp-max-connections", type=int, default=128,
                   help="open --tcp connections at most, fewer if the file limit is low "
                   "(default 128); further ones are refused with a message and closed")
    s.add_argument("--idle-exit-s", type=float, default=0.0,
                   help="exit once no client was connected for this long (0: never)")
    s.add_argument("--endpoint-file", type=Path, default=None, help=argparse.SUPPRESS)
    s.add_argument("--cache-size", type=int, default=256, help="exact-request result cache")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest HTTP request body accepted")
    s.add_argument("--max-in-flight", type=int, default=8,
                   help="jobs the engine runs at once, batched into shared passes (1: in turn)")
    s.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")


def build_options(args: argparse.Namespace):
    from engine.serve.server import ServeOptions, host_port, is_loopback

    model = args.model or _embedded_model()
    if model is None:
        raise EngineError("no --model given and no embedded model is installed")
    socket_path = None
    lock = args.lock
    if not args.no_socket:
        if not hasattr(__import__("socket"), "AF_UNIX"):
            raise EngineError("this platform has no Unix sockets: pass --no-socket --tcp "
                              "127.0.0.1:PORT")
        key = paths.engine_key(model, args.device, args.quant)
        socket_path = args.socket or paths.socket_path(paths.runtime_dir(), key)
        lock = lock or (paths.lock_path(socket_path.parent, key) if args.socket is None
                        else socket_path.with_suffix(".lock"))
    if socket_path is None and not (args.tcp or args.http):
        raise EngineError("nothing to serve: give a socket, --tcp or --http")
    for address in (args.tcp, args.http):
        if address and not is_loopback(host_port(address)[0]) and not args.allow_remote:
            raise EngineError(f"{address} is not a loopback address; pass --allow-remote to "
                              "bind it (clients will need the token)")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise EngineError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and not (args.http or args.tcp):
        raise EngineError("--tls-cert/--tls-key secure --tcp and --http; neither is given")
    if (args.http and not is_loopback(host_port(args.http)[0]) and args.tls_cert is None
            and not args.insecure_http):
        raise EngineError(f"--http {args.http} would send the token across the network in "
                          "clear: give --tls-cert and --tls-key (HTTPS), or --insecure-http to "
                          "accept that")
    if (args.tcp and not is_loopback(host_port(args.tcp)[0]) and args.tls_cert is None
            and not args.insecure_tcp):
        raise EngineError(f"--tcp {args.tcp} would send the token and your code across the "
                          "network in clear: give --tls-cert and --tls-key (editors then "
                          "connect to tls://HOST:PORT), or --insecure-tcp to accept that")
    if args.http_read_timeout_s <= 0 or args.http_max_connections < 1:
        raise EngineError("--http-read-timeout-s must be > 0 and --http-max-connections >= 1")
    if args.tcp_max_connections < 1:
        raise EngineError("--tcp-max-connections must be >= 1")
    if not args.hello_timeout_s > 0:
        raise EngineError("--hello-timeout-s must be > 0")
    return ServeOptions(
        model=model, device=args.device, quant=args.quant, socket=socket_path, lock=lock,
        tcp=host_port(args.tcp) if args.tcp else None,
        http=host_port(args.http) if args.http else None,
        token_file=args.token_file, allow_remote=args.allow_remote,
        idle_exit_s=args.idle_exit_s, endpoint_file=args.endpoint_file,
        cache_size=args.cache_size, max_body_bytes=args.max_body_bytes,
        max_in_flight=max(1, args.max_in_flight), tls_cert=args.tls_cert,
        tls_key=args.tls_key, http_read_timeout_s=args.http_read_timeout_s,
        http_max_connections=args.http_max_connections,
        tcp_max_connections=args.tcp_max_connections, hello_timeout_s=args.hello_timeout_s,
        http_allowed_hosts=tuple(args.allowed_host))


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    options = build_options(args)
    raise_file_limit()
    if options.http is not None:
        try:
            import aiohttp  # noqa: F401
            import prometheus_client  # noqa: F401
        except ImportError:
            raise EngineError("--http needs aiohttp and prometheus-client; install them into "
                              f"this environment: {install_hint('serve')}") from None
    from engine.serve.server import serve

    try:
        return asyncio.run(serve(options))
    except OSError as exc:  # a port in use, a folder we may not write
        raise EngineError(f"cannot serve: {exc}") from None


def raise_file_limit() -> None:
    """Raise the soft descriptor limit to the hard one (up to FILE_LIMIT): a server holds a
    descriptor per connection, and the 1024 many shells start with is soon short."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FILE_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.info("could not raise the file limit from %d: %s", soft, exc)


def _embedded_model() -> str | None:
    try:
        from engine.model.embedded_model import default_model_path
    except ImportError:
        return None
    path = default_model_path()
    return str(path) if path is not None else None


def add_token_parser(sub) -> None:
    t = sub.add_parser(
        "token", help="print the path of the token file HTTP and TCP clients must present",
        description="Print the path of the engine's token file (`cat` it for the token: "
        "curl -H \"Authorization: Bearer $(cat \"$(maskfill-engine token)\")\" ...). The "
        "default is `token` in the runtime folder: $MASKFILL_RUNTIME_DIR, else "
        "$XDG_RUNTIME_DIR/maskfill, else <tmp>/maskfill-<uid>. Exits 1 when there is no "
        "usable token there yet (an engine serving --tcp or --http creates it).")
    t.add_argument("--token-file", type=Path, default=None,
                   help="the --token-file an engine was started with")


def run_token(args: argparse.Namespace) -> int:
    """The path on stdout, so `$(cat "$(maskfill-engine token)")` works wherever it lives; the
    token itself is never printed (it would land in scrollback and logs)."""
    path = args.token_file or paths.runtime_dir() / paths.TOKEN_FILE_NAME
    if not path.exists():
        print(f"error: no token file at {path} yet: `maskfill-engine serve --http ...` (or "
              "--tcp) creates it", file=sys.stderr)
        return 1
    paths.read_token(path)  # refuses one that others can read, or that is empty
    print(path)
    return 0
