"""The Serve application: options, and `build_app(options)` -> ingress + engine deployments.

    serve run engine.serve.cluster.app:app_builder models='{"coder": "/models/dream-7b"}' ...

works too (Serve's own CLI, on a cluster that already runs); `maskfill-engine cluster` (cli.py)
is the plain entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from engine.serve.cluster.affinity import DEFAULT_ABS_SLACK, DEFAULT_REL_SLACK

APP_NAME = "maskfill"
ROUTER_CLASS = "engine.serve.cluster.router:SessionAffinityRouter"


class Autoscaling(msgspec.Struct, kw_only=True, frozen=True):
    """Serve's autoscaling on queue depth: replicas are added while the requests queued or
    running per replica stay above `target_ongoing_requests`. 8 is half a GPU replica's
    row budget (16), so a replica keeps batching headroom. Never to zero by default: a 7B
    load takes tens of seconds."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0

    def to_serve(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class ClusterOptions(msgspec.Struct, kw_only=True, frozen=True):
    models: dict[str, str]  # name -> checkpoint folder or HF repo id; the first is the default
    token_digest: bytes  # contract.token_digest of the Bearer token
    device: str = "cpu"  # "cuda": one GPU per replica (gpus_per_replica)
    quant: str = "none"
    replicas: int = 2
    autoscaling: Autoscaling | None = None  # replaces `replicas` when set
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 1.0  # with device cuda; 0.5 puts two small replicas on a GPU
    max_ongoing_requests: int = 16  # per replica: room to batch (row budget 16 on a GPU)
    max_in_flight: int = 8  # jobs a replica's engine runs at once, batched into shared passes
    cache_size: int = 256  # exact-request cache per replica and model
    max_models_per_replica: int = 2
    ingress_replicas: int = 1
    ingress_cpus: float = 0.0  # the ingress only parses and forwards
    max_body_bytes: int = 1024 * 1024
    abs_slack: float = DEFAULT_ABS_SLACK
    rel_slack: float = DEFAULT_REL_SLACK
    routing_stats_period_s: float = 2.0  # how fresh /metrics' per-replica figures are
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    graceful_shutdown_timeout_s: float = 20.0  # drain: in-flight completions finish first
    env: dict[str, str] = msgspec.field(default_factory=dict)  # replicas' extra environment
    # "routed": FimIngress -> SessionAffinityRouter -> FimEngine (load guard, retry on another
    # replica); "direct": the engine replicas take HTTP themselves (direct.py), one hop less.
    topology: Literal["routed", "direct"] = "routed"
    haproxy: bool = False  # Serve's HAProxy ingress is on (it refuses a router on the ingress)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one model is needed")
        if self.replicas < 1 or self.ingress_replicas < 1:
            raise ValueError("replicas and ingress_replicas must be >= 1")
        if self.topology == "direct" and len(self.models) > 1:
            raise ValueError("the direct topology serves one checkpoint (no multiplexing)")


def haproxy_env(topology: str, folder: Path) -> dict[str, str]:
    """Cluster-wide settings for Serve's HAProxy ingress, read when Serve starts. Its files
    go to `folder` (private; Serve's default is a shared /tmp folder with a world-writable
    admin socket). In front of the direct topology HAProxy does the routing: it hashes the
    session header onto the replicas, and may replay a request whose replica closed the
    connection without answering (FIM is idempotent)."""
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
           "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
           "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
           "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
           "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state")}
    if topology == "direct":
        env.update(RAY_SERVE_HAPROXY_BALANCE_ALGORITHM="hdr(x-session-id)",
                   RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response")
    return env


def direct_ingress_env(port: int, spare: int = 0, optimized: bool = False) -> dict[str, str]:
    """Cluster-wide settings, read when Serve starts, for Serve's direct ingress: the ingress
    replica (FimIngress) serves HTTP itself on `port` (the next `spare` ports for replacements
    while an old one drains), so a request skips the proxy's hop and keeps the routed
    topology's retry on another engine replica. It binds the http_options host. `optimized`:
    Serve's whole throughput-optimized set too (handle calls over gRPC, user code and router
    on the replica's own event loop, access logs buffered, GC frozen after start)."""
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + spare)}
    if optimized:
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    return env


DIRECT_INGRESS_SPARE_PORTS = 8  # after the first: for an ingress replica's replacement


def find_direct_ingress(host: str, first: int, spare: int = DIRECT_INGRESS_SPARE_PORTS,
                        timeout_s: float = 120.0) -> int:
    """The port of `first`..`first + spare` on which the ingress replica serves HTTP (Serve's
    direct ingress takes the first free one; it listens a little after serve.run returns):
    the first that answers GET /health at all."""
    import http.client
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for port in range(first, first + spare + 1):
            connection = http.client.HTTPConnection(host, port, timeout=5.0)
            try:
                connection.request("GET", "/health")
                connection.getresponse().read()
                return port
            except (OSError, http.client.HTTPException):
                continue
            finally:
                connection.close()
        time.sleep(0.2)
    raise TimeoutError(f"no ingress replica listens on {host}:{first}-{first + spare}")


def engine_actor_options(options: ClusterOptions) -> dict[str, Any]:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **options.env}
    actor: dict[str, Any] = {"num_cpus": options.cpus_per_replica,
                             "runtime_env": {"env_vars": env}}
    if options.device.startswith("cuda"):
        actor["num_gpus"] = options.gpus_per_replica
    return actor


def build_app(options: ClusterOptions):
    """The Application to `serve.run`: FimIngress at "/" in front of FimEngine, or (direct)
    DirectFimEngine alone."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from engine.serve.cluster.direct import DirectFimEngine
    from engine.serve.cluster.ingress import FimIngress
    from engine.serve.cluster.replica import FimEngine

    direct = options.topology == "direct"
    deployment: dict[str, Any] = (
        {"autoscaling_config": options.autoscaling.to_serve()} if options.autoscaling
        else {"num_replicas": options.replicas})
    if not (direct and options.haproxy):
        deployment["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"abs_slack": options.abs_slack,
                                   "rel_slack": options.rel_slack},
            request_routing_stats_period_s=options.routing_stats_period_s)
    engine_options = dict(device=options.device, quant=options.quant,
                          cache_size=options.cache_size, max_in_flight=options.max_in_flight,
                          max_models=options.max_models_per_replica)
    engine = serve.deployment(DirectFimEngine if direct else FimEngine).options(
        name="FimEngine",
        ray_actor_options=engine_actor_options(options),
        max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=options.health_check_timeout_s,
        graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=1.0,
        **deployment,
    )
    if direct:
        return engine.bind(options.models, token_digest=options.token_digest,
                           max_body_bytes=options.max_body_bytes, **engine_options)
    engine = engine.bind(options.models, **engine_options)
    ingress = serve.deployment(FimIngress).options(
        name="FimIngress",
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": options.ingress_cpus},
        max_ongoing_requests=1024,
        graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
    )
    return ingress.bind(engine, token_digest=options.token_digest, models=list(options.models),
                        max_body_bytes=options.max_body_bytes)


def app_builder(args: dict[str, Any]):
    """For `serve run engine.serve.cluster.app:app_builder key=value ...`: `models` (JSON object)
    and `token_file` are required; other keys are ClusterOptions fields."""
    import json
    from pathlib import Path

    from engine.serve.cluster.contract import token_digest
    from engine.serve.paths import read_token

    args = dict(args)
    models = args.pop("models")
    token = read_token(Path(args.pop("token_file")).expanduser())
    options = msgspec.convert(
        {**args, "models": json.loads(models) if isinstance(models, str) else models,
         "token_digest": token_digest(token)}, ClusterOptions, strict=False)
    return build_app(options)
