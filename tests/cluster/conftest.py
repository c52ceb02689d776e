"""One real local Ray cluster (in-process `ray.init`, 2 CPUs, loopback), with the maskfill
application deployed: 2 engine replicas of a tiny random checkpoint behind the FIM ingress.
Starting it costs ~30 s on a 2-core machine, so every cluster test shares it: they all live in
test_cluster.py and the fixture is module-scoped, so the cluster (about 1.2 GB and a dozen
processes) is gone before the rest of the suite runs. Teardown checks that no Ray process is
left.

Ray's token auth is on with a token in a private temp folder (nothing lands in ~/.ray). Ray
reads the auth mode when it is first imported, so this module must not import it at load."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("the `cluster` extra (ray[serve]) is not installed", allow_module_level=True)

TOKEN = "cluster-test-token"
RAY_ENV = {"RAY_DISABLE_USAGE_STATS": "1", "RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S": "30"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (Linux /proc; [] elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return [pid for pid in found if pid != os.getpid()]


@dataclass
class Cluster:
    url: str
    port: int
    app: str
    model: Path

    def headers(self, session: str | None = None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        if session:
            out["x-session-id"] = session
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path_factory.mktemp("cluster-model"))
    temp = Path(tempfile.mkdtemp(prefix="mfray-"))  # short: Ray's socket paths must fit
    env = dict(RAY_ENV)
    if "ray" not in sys.modules:  # else Ray already read its auth mode (off): keep it so
        auth = temp / "auth_token"
        auth.write_text(secrets.token_hex(16))
        auth.chmod(0o600)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(auth))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import ray
    from ray import serve

    from engine.serve.cluster.app import APP_NAME, ClusterOptions, build_app
    from engine.serve.cluster.contract import token_digest

    port = free_port()
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=str(temp), log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ClusterOptions(models={"tiny": str(model)}, token_digest=token_digest(TOKEN),
                                 replicas=2, cpus_per_replica=0.5, max_in_flight=4)
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        yield Cluster(url=f"http://127.0.0.1:{port}", port=port, app=APP_NAME, model=model)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        deadline = time.monotonic() + 15
        while processes_mentioning(str(temp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_mentioning(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left after shutdown: {left}"
