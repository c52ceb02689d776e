"""`make bench-cluster`: the embedded model on a local Ray cluster of 2 replicas, against one
engine, with keystroke sessions replayed over HTTP and one replica killed mid-load.

    python -m engine.bench.cluster [--documents 4] [--keys 55] [--direct] [--quick]
                                   [--haproxy | --direct-ingress | --throughput-optimized]

1. Sessions: in each of `--documents` engine source files a function's first characters are
   deleted and typed back one key at a time (engine/bench/keystroke_replay.py's windows and stop
   mode); every key is one request, sent once the previous answer is back (an editor with a
   fast model). The documents are typed at the same time.
2. One engine: the same sessions on engine.engine.Engine in this process -> its warm rate
   (requests whose context K/V came from an earlier request).
3. Overhead probe, same requests on both fronts, taking turns: the single shared engine
   (`maskfill-engine serve --http`, running beside the cluster) and the cluster each answer a
   set of requests from their exact-request cache (every request sent once first), so a round
   trip is transport and routing only: `router_overhead_ms_p50` = cluster p50 - shared p50.
4. The cluster replays the sessions (x-session-id: the document); when about 40% are done, the
   replica serving a session's request in flight is killed (SIGKILL). Every request in flight
   on it must still get an answer (from the other replica, on the ingress's retry).

Prints a table, then one JSON line: replicas, requests, lost (no HTTP answer), errors (an answer
other than 200), session_sticky_rate (requests served by the replica that served their
session's previous one), warm_rate_ratio_vs_one_replica, router_overhead_ms_p50,
killed_replica_requests_answered, and the figures behind them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.api import CompletionRequest, EngineError
from engine.bench.keystroke_replay import request_at
from engine.bench.shared_engine import stop_engine
from engine.serve.fim_wire import FimRequest, stop_strings, to_engine_request

ENGINE_DIR = Path(__file__).resolve().parents[1]
DOCUMENTS = [  # (file, where typing starts)
    ("stop.py", "def stop_for_cursor("),
    ("denoise/fim.py", "def precut_text("),
    ("denoise/sampler.py", "def "),
    ("api.py", "class CompletionStats"),
    ("denoise/context_cache.py", "class "),
    ("denoise/committer.py", "def "),
]
PROBE_REQUESTS = 8
PROBE_ROUNDS = 12
KILL_AT = 0.4  # share of the replay done when a replica is killed
INGRESS_PORTS = 8  # Serve's direct ingress: the port range of the ingress replica
FIM = "/v1/fim/completions"


@dataclass
class Key:
    session: str
    body: dict
    status: int | None = None
    replica: str = ""
    attempts: int = 0
    reused: int = 0
    ms: float = 0.0
    engine_ms: float = 0.0
    error: str | None = None
    in_flight_at_kill: bool = False


@dataclass
class Session:
    name: str
    keys: list[Key] = field(default_factory=list)
    current: Key | None = None


def body_for(request: CompletionRequest) -> dict:
    body: dict = {"prompt": request.prefix, "suffix": request.suffix,
                  "max_tokens": request.max_tokens}
    if request.stop == "line":
        body["stop"] = ["\n"]
    return body


def engine_request(body: dict) -> CompletionRequest:
    fim = FimRequest(**body)
    return to_engine_request(fim, stop_strings(fim.stop))


def build_sessions(documents: int, keys: int) -> list[Session]:
    sessions = []
    for name, marker in DOCUMENTS[:documents]:
        source = (ENGINE_DIR / name).read_text(encoding="utf-8")
        start = source.index(marker)
        typed = source[start:start + keys]
        before, after = source[:start], source[start + keys:]
        session = Session(name)
        for i in range(keys):
            text = before + typed[:i + 1] + after
            session.keys.append(Key(name, body_for(request_at(text, len(before) + i + 1))))
        sessions.append(session)
    return sessions


# -- one engine, in process ---------------------------------------------------------------

def replay_one_engine(model: str, sessions: list[Session]) -> dict:
    from engine.engine import Engine

    engine = Engine.load(model)
    engine.use_cpu_threads()
    reused: list[int] = []
    latencies: list[float] = []

    def type_session(session: Session) -> None:
        for key in session.keys:
            started = time.perf_counter()
            result = engine.complete(engine_request(key.body))
            latencies.append((time.perf_counter() - started) * 1000.0)
            reused.append(result.stats.reused_context_tokens)

    try:
        _run_all(type_session, sessions)
    finally:
        engine.close()
    return {"requests": len(reused), "warm_rate": _share(r > 0 for r in reused),
            "ms_p50": statistics.median(latencies)}


# -- HTTP ----------------------------------------------------------------------------------

class Client:
    def __init__(self, port: int, token: str):
        self.port, self.token = port, token

    def post(self, body: dict, session: str | None = None, timeout: float = 120.0):
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if session:
            headers["x-session-id"] = session
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            started = time.perf_counter()
            connection.request("POST", FIM, body=json.dumps(body), headers=headers)
            response = connection.getresponse()
            data = response.read()
            ms = (time.perf_counter() - started) * 1000.0
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data, ms
        finally:
            connection.close()


def probe_bodies() -> list[dict]:
    code = "def total(items):\n    result = 0\n    for item in items:\n        result += item\n"
    return [{"prompt": f"# probe {i}\n" + code[:20 + 3 * i], "suffix": code[20 + 3 * i:],
             "max_tokens": 8} for i in range(PROBE_REQUESTS)]


def overhead_probe(shared: Client, cluster: Client) -> tuple[float, float, dict[str, float]]:
    """p50 round trips (shared engine, cluster) of requests answered from the exact-request
    cache, the two fronts taking turns request by request (the machine's load then weighs on
    both alike); and where the cluster's time goes, p50s from its headers: `http_ms` (round
    trip minus the front: Serve's proxy or direct-ingress server, HTTP), `handle_ms` (front
    minus replica: our front's work and the handle hop to the engine replica), `engine_ms`."""
    bodies = probe_bodies()
    for i, body in enumerate(bodies):  # fill the caches (the cluster's: on the home replica)
        for client, session in ((shared, None), (cluster, f"probe-{i}")):
            status = client.post(body, session)[0]
            if status != 200:
                raise EngineError(f"probe request answered {status}")
    times: dict[int, list[float]] = {0: [], 1: []}
    split: dict[str, list[float]] = {"http_ms": [], "handle_ms": [], "engine_ms": []}
    for _ in range(PROBE_ROUNDS):
        for i, body in enumerate(bodies):
            times[0].append(shared.post(body)[3])
            _, headers, _, ms = cluster.post(body, f"probe-{i}")
            times[1].append(ms)
            if "x-maskfill-front-ms" in headers:
                front, engine = (float(headers[f"x-maskfill-{k}-ms"]) for k in ("front", "engine"))
                split["http_ms"].append(ms - front)
                split["handle_ms"].append(front - engine)
                split["engine_ms"].append(engine)
    return (statistics.median(times[0]), statistics.median(times[1]),
            {k: round(statistics.median(v), 2) for k, v in split.items() if v})


def find_ingress(first: int, token: str) -> int:
    """The port Serve's direct ingress gave the ingress replica (the first free one of its
    range); it listens a little after serve.run returns."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for port in range(first, first + INGRESS_PORTS):
            try:
                if Client(port, token).post(probe_bodies()[0], "find", 5.0)[0] == 200:
                    return port
            except (OSError, http.client.HTTPException):
                continue
        time.sleep(0.2)
    raise EngineError("the ingress replica did not listen")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharedEngine:
    """`maskfill-engine serve --http` on the embedded model, for the overhead probe."""

    def __init__(self, model: str, token_file: Path, token: str):
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--model", model, "--no-socket",
             "--http", f"127.0.0.1:{port}", "--token-file", str(token_file)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.client = Client(port, token)
        if not self.process.stdout.readline():
            self.close()
            raise EngineError("the shared engine did not start")
        deadline = time.monotonic() + 120
        while self.client.post(probe_bodies()[0])[0] == 503 and time.monotonic() < deadline:
            time.sleep(0.2)  # the model is loading

    def close(self) -> None:
        stop_engine(self.process)


# -- the cluster ---------------------------------------------------------------------------

class Killer:
    """Kills, once, the replica serving some session's request in flight."""

    def __init__(self, app: str, pids: dict[str, int], sessions: list[Session], total: int):
        self.app, self.pids, self.sessions, self.total = app, pids, sessions, total
        self.watcher: threading.Thread | None = None
        self.noticed = False  # Serve saw the replica die
        self.replacement_s: float | None = None
        self.done = 0
        self.lock = threading.Lock()
        self.victim: str | None = None
        self.killed_at: float | None = None
        self.in_flight: list[Key] = []

    def after_answer(self) -> None:
        with self.lock:
            self.done += 1
            if self.victim is None and self.done >= KILL_AT * self.total:
                self._kill()

    def _kill(self) -> None:
        pids = self.pids
        for session in self.sessions:
            key = session.current
            last = [k.replica for k in session.keys if k.replica]
            if key is not None and last and last[-1] in pids:
                self.victim = last[-1]
                break
        else:
            return  # nothing in flight right now: the next answer tries again
        in_flight = [s.current for s in self.sessions if s.current is not None
                     and [k.replica for k in s.keys if k.replica][-1:] == [self.victim]]
        os.kill(pids[self.victim], signal.SIGKILL)
        self.killed_at = time.monotonic()
        for key in in_flight:
            key.in_flight_at_kill = True
        self.in_flight = in_flight
        self.watcher = threading.Thread(target=self._watch_replacement, daemon=True)
        self.watcher.start()

    def _watch_replacement(self, timeout_s: float = 180.0) -> None:
        """Seconds from the kill until Serve runs as many replicas as before."""
        from ray import serve

        assert self.killed_at is not None
        while time.monotonic() - self.killed_at < timeout_s:
            deployments = serve.status().applications[self.app].deployments
            if deployments["FimEngine"].replica_states.get("RUNNING", 0) >= len(self.pids):
                # the dead one is gone from RUNNING once Serve noticed: wait for that first
                if self.noticed:
                    self.replacement_s = time.monotonic() - self.killed_at
                    return
            else:
                self.noticed = True
            time.sleep(0.25)


def replay_cluster(client: Client, sessions: list[Session], killer: Killer) -> None:
    def type_session(session: Session) -> None:
        for key in session.keys:
            session.current = key
            try:
                status, headers, _, ms = client.post(key.body, session.name)
            except (OSError, http.client.HTTPException) as exc:
                key.error = f"{type(exc).__name__}: {exc}"
            else:
                key.status, key.ms = status, ms
                key.replica = headers.get("x-maskfill-replica", "")
                key.attempts = int(headers.get("x-maskfill-attempts", 0))
                key.reused = int(headers.get("x-maskfill-reused-tokens", 0))
                key.engine_ms = float(headers.get("x-maskfill-engine-ms", 0.0))
            session.current = None
            killer.after_answer()

    _run_all(type_session, sessions)


def cluster_phase(model: str, sessions: list[Session], token: str, haproxy: bool,
                  topology: str, shared: SharedEngine, direct_ingress: bool = False,
                  optimized: bool = False) -> dict:
    temp = Path(tempfile.mkdtemp(prefix="mfbench-"))
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        auth = temp / "auth_token"  # Ray's token auth on, with a private token
        auth.write_text(secrets.token_hex(16))
        auth.chmod(0o600)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(auth))
    from engine.serve.cluster.app import (
        APP_NAME,
        ClusterOptions,
        build_app,
        direct_ingress_env,
        haproxy_env,
    )

    if haproxy:
        os.environ.update(haproxy_env(topology, temp))
        if optimized:  # Serve's throughput-optimized set behind HAProxy (gRPC handle calls)
            os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    ingress_port = free_port()
    if direct_ingress:  # the ingress replica takes HTTP on a port from ingress_port on
        os.environ.update(direct_ingress_env(ingress_port, INGRESS_PORTS, optimized))
    import ray
    from ray import serve

    from engine.serve.cluster.contract import token_digest

    port = free_port()
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=str(temp), log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ClusterOptions(models={"embedded": model}, token_digest=token_digest(token),
                                 replicas=2, cpus_per_replica=1.0, topology=topology,
                                 haproxy=haproxy)
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        if haproxy:
            time.sleep(5.0)  # HAProxy lists the replicas a little after serve.run returns
        ready_s = time.monotonic() - started
        client = Client(find_ingress(ingress_port, token) if direct_ingress else port, token)
        shared_probe, probe, probe_split = overhead_probe(shared.client, client)
        total = sum(len(s.keys) for s in sessions)
        from engine.serve.cluster.registry import replica_pids

        killer = Killer(APP_NAME, replica_pids(APP_NAME), sessions, total)
        replay_cluster(client, sessions, killer)
        if killer.watcher is not None:
            killer.watcher.join()
        return {"probe_ms_p50": probe, "shared_probe_ms_p50": shared_probe,
                "probe_split": probe_split,
                "ready_s": ready_s, "killer": killer,
                "replacement_s": killer.replacement_s}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# -- figures -------------------------------------------------------------------------------

def _run_all(work, sessions: list[Session]) -> None:
    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def figures(sessions: list[Session], one: dict, cluster: dict) -> dict:
    keys = [k for s in sessions for k in s.keys]
    answered = [k for k in keys if k.status == 200]
    sticky = []
    for session in sessions:
        served = [k.replica for k in session.keys if k.status == 200]
        sticky += [a == b for a, b in zip(served, served[1:], strict=False)]
    killer: Killer = cluster["killer"]
    overheads = [k.ms - k.engine_ms for k in answered]
    warm_cluster = _share(k.reused > 0 for k in answered)
    return {
        "replicas": 2,
        "requests": len(keys),
        "lost": sum(k.status is None for k in keys),
        "errors": sum(k.status is not None and k.status != 200 for k in keys),
        "session_sticky_rate": round(_share(sticky), 4),
        "warm_rate_cluster": round(warm_cluster, 4),
        "warm_rate_one_engine": round(one["warm_rate"], 4),
        "warm_rate_ratio_vs_one_replica": round(warm_cluster / one["warm_rate"], 4)
        if one["warm_rate"] else None,
        "router_overhead_ms_p50": round(cluster["probe_ms_p50"] - cluster["shared_probe_ms_p50"],
                                        2),
        "cluster_probe_ms_p50": round(cluster["probe_ms_p50"], 2),
        "shared_engine_probe_ms_p50": round(cluster["shared_probe_ms_p50"], 2),
        "cluster_probe_split_ms_p50": cluster["probe_split"],
        "cluster_overhead_ms_p50_replay": round(statistics.median(overheads), 2)
        if overheads else None,
        "cluster_ms_p50": round(statistics.median([k.ms for k in answered]), 1)
        if answered else None,
        "one_engine_ms_p50": round(one["ms_p50"], 1),
        "killed_replica": killer.victim,
        "killed_replica_in_flight": len(killer.in_flight),
        "killed_replica_retried": sum(k.attempts == 2 for k in killer.in_flight),
        "killed_replica_requests_answered": bool(killer.in_flight) and all(
            k.status == 200 for k in killer.in_flight),
        "retried_requests": sum(k.attempts == 2 for k in keys),
        "replacement_s": round(cluster["replacement_s"], 1)
        if cluster["replacement_s"] is not None else None,
        "cluster_ready_s": round(cluster["ready_s"], 1),
    }


TARGETS = {  # key: (target, higher is better)
    "lost": (0, False), "errors": (0, False), "session_sticky_rate": (0.95, True),
    "warm_rate_ratio_vs_one_replica": (0.9, True), "router_overhead_ms_p50": (5.0, False),
}


def print_table(out: dict, ingress: str) -> None:
    print(f"maskfill cluster bench: 2 replicas, embedded model, {ingress} ingress, "
          f"{out['topology']} topology")
    for key, value in out.items():
        target = TARGETS.get(key)
        mark = ""
        if target is not None and value is not None:
            limit, higher = target
            if key == "router_overhead_ms_p50" and out["topology"] == "direct":
                limit = 2.0
            ok = value >= limit if higher else value <= limit
            mark = f"  target {'>=' if higher else '<='} {limit}: {'ok' if ok else 'MISSED'}"
        print(f"  {key:<36} {value}{mark}")


def run(documents: int, keys: int, haproxy: bool, topology: str,
        direct_ingress: bool = False, optimized: bool = False) -> dict:
    from engine.model.embedded_model import default_model_path
    from engine.serve import paths

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    model = default_model_path()
    if model is None:
        raise EngineError("the bench needs the embedded model (engine/model/embedded/)")
    folder = Path(tempfile.mkdtemp(prefix="mfbench-token-"))
    token_file = folder / "token"
    token = paths.ensure_token(token_file)
    print(f"sessions: {documents} documents x {keys} keys", file=sys.stderr)
    try:
        one = replay_one_engine(str(model), build_sessions(documents, keys))
        print(f"one engine: {one}", file=sys.stderr)
        shared = SharedEngine(str(model), token_file, token)
        try:
            sessions = build_sessions(documents, keys)
            cluster = cluster_phase(str(model), sessions, token, haproxy, topology, shared,
                                    (direct_ingress or optimized) and not haproxy, optimized)
        finally:
            shared.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ingress = ("haproxy" + ("+throughput-optimized" if optimized else "") if haproxy
               else "throughput-optimized" if optimized
               else "direct-ingress" if direct_ingress else "proxy")
    return {"ingress": ingress, "topology": topology, "load_average": os.getloadavg(),
            **figures(sessions, one, cluster)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.cluster",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=4, choices=range(1, len(DOCUMENTS) + 1))
    parser.add_argument("--keys", type=int, default=55, help="keys typed per document")
    parser.add_argument("--haproxy", action="store_true", help="Serve's HAProxy ingress")
    parser.add_argument("--direct", action="store_true",
                        help="the direct topology (engine replicas take HTTP)")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="Serve's direct ingress: the ingress replica takes HTTP, no proxy")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED set: with its direct "
                        "ingress, or behind --haproxy")
    parser.add_argument("--quick", action="store_true", help="2 documents x 12 keys (smoke)")
    args = parser.parse_args(argv)
    documents, keys = (2, 12) if args.quick else (args.documents, args.keys)
    if args.direct_ingress and (args.haproxy or args.direct):
        parser.error("--direct-ingress is the routed topology without Serve's proxy")
    if args.throughput_optimized and args.direct and not args.haproxy:
        parser.error("--throughput-optimized: with Serve's direct ingress or --haproxy")
    try:
        out = run(documents, keys, args.haproxy, "direct" if args.direct else "routed",
                  args.direct_ingress, args.throughput_optimized)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(out, out["ingress"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
