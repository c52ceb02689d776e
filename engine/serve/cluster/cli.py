"""`maskfill-engine cluster`: deploy the engine as a Ray Serve application, on a Ray cluster
that already runs (`--address`) or on a local one started here, and serve the HTTP FIM API.

Prints one JSON line once every replica can answer ({"http": URL, "app", "replicas",
"models", "ray": address}), then serves until SIGINT/SIGTERM and removes the application
(and stops the local cluster it started). With `--detach` (needs `--address`) it deploys and
returns; the application keeps running on the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import get_args

from engine.api import EngineError, QuantMode
from engine.serve import paths

DEFAULT_HTTP = "127.0.0.1:8000"


def add_cluster_parser(sub) -> None:
    c = sub.add_parser(
        "cluster", help="serve the HTTP FIM API from Ray Serve replicas (past one machine)",
        description="Deploy the engine as a Ray Serve application: an HTTP ingress with the "
        "same FIM API as `serve --http`, in front of N engine replicas (one GPU each with "
        "--device cuda). Editing sessions (x-session-id header or `session` body field) "
        "stick to the replica holding their context unless it is overloaded. Needs "
        "`pip install 'maskfill[cluster]'`.")
    c.add_argument("--model", action="append", default=None, metavar="[NAME=]CHECKPOINT",
                   help="checkpoint folder or HF repo id (local cache); repeat to serve several "
                   "(clients pick one with the body's `model`; the first is the default); "
                   "default: the embedded model")
    c.add_argument("--address", default=None, help="Ray cluster to deploy on ('auto', "
                   "HOST:PORT of a head node); default: start a local one")
    c.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs of the local cluster (default: all)")
    c.add_argument("--http", default=DEFAULT_HTTP, metavar="HOST:PORT",
                   help=f"where Serve's HTTP ingress listens (default {DEFAULT_HTTP})")
    c.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --http address (clients need the token)")
    c.add_argument("--token-file", type=Path, default=None, help="Bearer token for HTTP "
                   "clients; created (0600) when missing (default: <runtime folder>/token)")
    c.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2)")
    c.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                   help="scale on queue depth between MIN and MAX replicas instead")
    c.add_argument("--target-ongoing", type=float, default=8.0,
                   help="--autoscale: requests queued or running per replica to aim for")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    c.add_argument("--quant", default="none", choices=get_args(QuantMode))
    c.add_argument("--gpus-per-replica", type=float, default=1.0)
    c.add_argument("--cpus-per-replica", type=float, default=1.0)
    c.add_argument("--max-ongoing", type=int, default=16,
                   help="requests a replica takes at once (it batches them)")
    c.add_argument("--ingress-replicas", type=int, default=1)
    c.add_argument("--haproxy", action="store_true", help="low-latency ingress on a fixed "
                   "port: Serve's HAProxy instead of its Python proxy, with Serve's "
                   "throughput-optimized settings; same router, retry and streaming (local "
                   "cluster; on an existing one, start it with RAY_SERVE_ENABLE_HA_PROXY=1 "
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    c.add_argument("--direct-ingress", action="store_true", help="lower latency, nothing "
                   "given up: no Serve proxy; the ingress replica serves HTTP itself (Serve's "
                   "direct ingress and throughput-optimized settings), keeping the session "
                   "router, the retry on another replica and streaming. Its port is the "
                   "--http port, or one of the next 8 when the ingress replica is replaced "
                   "(the line printed at start names it). Local cluster; on an existing one, "
                   "start it with RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    c.add_argument("--direct", action="store_true", help="engine replicas take HTTP "
                   "themselves, one hop less; with --haproxy, HAProxy hashes x-session-id "
                   "(no load guard; one checkpoint)")
    c.add_argument("--detach", action="store_true", help="deploy and exit (needs --address)")
    c.add_argument("-v", "--verbose", action="store_true", help="Ray's logs on stderr")


def parse_models(specs: list[str] | None) -> dict[str, str]:
    """`NAME=CHECKPOINT` or `CHECKPOINT` (named by itself, so a client's `model` can be the
    same string it would send to one engine)."""
    if not specs:
        from engine.serve.cli import _embedded_model

        embedded = _embedded_model()
        if embedded is None:
            raise EngineError("no --model given and no embedded model is installed")
        specs = [embedded]
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            name, path = spec, spec
        if not path:
            raise EngineError(f"--model {spec!r}: expected [NAME=]CHECKPOINT")
        if name in models:
            raise EngineError(f"--model: {name!r} is given twice")
        models[name] = str(Path(path).expanduser().resolve()) if Path(path).exists() else path
    return models


def build_options(args: argparse.Namespace, token: str):
    from engine.serve.cluster.app import Autoscaling, ClusterOptions
    from engine.serve.cluster.contract import token_digest

    autoscaling = None
    if args.autoscale:
        low, sep, high = args.autoscale.partition(":")
        if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
            raise EngineError(f"--autoscale {args.autoscale!r}: expected MIN:MAX, 1 <= MIN <= MAX")
        autoscaling = Autoscaling(min_replicas=int(low), max_replicas=int(high),
                                  target_ongoing_requests=args.target_ongoing)
    try:
        return ClusterOptions(
            models=parse_models(args.model), token_digest=token_digest(token),
            device=args.device, quant=args.quant, replicas=args.replicas,
            autoscaling=autoscaling, cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica, max_ongoing_requests=args.max_ongoing,
            ingress_replicas=args.ingress_replicas,
            topology="direct" if args.direct else "routed", haproxy=args.haproxy)
    except ValueError as exc:
        raise EngineError(str(exc)) from None


def run_cluster(args: argparse.Namespace) -> int:
    from engine.serve.server import host_port, is_loopback

    host, port = host_port(args.http)
    if not is_loopback(host) and not args.allow_remote:
        raise EngineError(f"{args.http} is not a loopback address; pass --allow-remote to bind "
                          "it (clients will need the token)")
    if args.detach and not args.address:
        raise EngineError("--detach needs --address: a local cluster ends with this command")
    token = paths.ensure_token(args.token_file or paths.runtime_dir() / paths.TOKEN_FILE_NAME)
    options = build_options(args, token)
    if args.direct_ingress and port == 0:
        raise EngineError("--direct-ingress needs a fixed --http port (the ingress replica "
                          "takes it or one of the next 8)")
    if args.direct_ingress and (args.haproxy or args.direct):
        raise EngineError("--direct-ingress is the routed topology without Serve's proxy; "
                          "--haproxy and --direct are the other low-latency modes")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if args.direct_ingress:
        from engine.serve.cluster.app import DIRECT_INGRESS_SPARE_PORTS, direct_ingress_env

        os.environ.update(direct_ingress_env(port, DIRECT_INGRESS_SPARE_PORTS, optimized=True))
    if args.haproxy:
        from engine.serve.cluster.app import haproxy_env

        # A short private folder (0700): Serve puts HAProxy's sockets in a 56-character folder
        # under it, and HAProxy refuses a socket path over 97 characters (the runtime folder
        # was too deep: "socket path ... too long").
        folder = Path(tempfile.mkdtemp(prefix="mfha-"))
        os.environ.update(haproxy_env(options.topology, folder))
        if options.topology == "routed":  # handle calls over gRPC: the ingress -> replica hop
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # costs half
    try:  # after the environment is set: Ray reads parts of it at import
        import ray
        from ray import serve
    except ImportError:
        raise EngineError("`cluster` needs Ray Serve: pip install 'maskfill[cluster]'") from None
    from engine.serve.cluster.app import APP_NAME, build_app, find_direct_ingress

    local = args.address is None
    init = dict(address=args.address, log_to_driver=args.verbose)
    if local:
        init.update(num_cpus=args.num_cpus, include_dashboard=False)
        if is_loopback(host):  # one machine: Ray's own processes on loopback too
            init["_node_ip_address"] = "127.0.0.1"
    try:
        context = ray.init(**init)
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        if args.direct_ingress:  # the port Serve gave the ingress replica
            port = find_direct_ingress("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        _stop(local, APP_NAME)
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        cause = " | ".join(lines[-6:]) if lines else repr(exc)  # a remote error's cause is last
        raise EngineError(f"cannot deploy on Ray: {cause}") from None
    shown = f"[{host}]" if ":" in host else host
    endpoints = {"http": f"http://{shown}:{port}", "app": APP_NAME,
                 "replicas": options.replicas if options.autoscaling is None else "auto",
                 "models": list(options.models), "ray": context.address_info.get("address")}
    print(json.dumps(endpoints, separators=(",", ":")), flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        _stop(local, APP_NAME)
    return 0


def _stop(local: bool, app_name: str) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(app_name)
    except Exception as exc:  # shutting down: report, never hang on it
        print(f"maskfill-engine cluster: while stopping: {exc}", file=sys.stderr)
    ray.shutdown()
