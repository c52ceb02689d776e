"""The maskfill Serve application on a real local Ray cluster (conftest.py): the HTTP FIM
contract of the shared engine, sessions kept on one replica, an overloaded replica spilling a
session, two checkpoints from one cluster, a hung-up caller's job stopped, and a replica killed
mid-request (its request answered by the other replica, the replica replaced).

The failover test kills a replica, so it stays last in this module."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter

import pytest

from engine.api import CompletionRequest
from engine.serve.cluster.registry import replica_pids
from engine.serve.fim_wire import FimRequest, to_engine_request
from tests.cluster.conftest import TOKEN, Cluster
from tests.service.conftest import fim_answer

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FIM = "/v1/fim/completions"
CODE = "def total(items):\n    result = 0\n    for item in items:\n        result += item\n"


def post(cluster: Cluster, body: dict | bytes, session: str | None = None, *,
         headers: dict | None = None, path: str = FIM, timeout: float = 120.0):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=timeout)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", path, body=raw,
                           headers=headers if headers is not None else cluster.headers(session))
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


def get(cluster: Cluster, path: str, token: str | None = TOKEN):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def engine_request(body: dict) -> CompletionRequest:
    """The request the ingress hands the engine for this body (no stops)."""
    return to_engine_request(FimRequest(**body), [])


def body_at(i: int, **extra) -> dict:
    cut = 10 + (i * 7) % (len(CODE) - 20)
    return {"prompt": f"# {i}\n" + CODE[:cut], "suffix": CODE[cut:], "max_tokens": 8, **extra}


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_answers_in_the_shared_engines_shape_with_the_engines_answer(cluster):
    body = {"prompt": "def add(a, b):\n", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 16}
    expected = fim_answer(cluster.model, engine_request(body))
    status, headers, raw = post(cluster, {**body, "model": "mercury-coder"}, "doc-parity")
    assert status == 200, raw
    data = json.loads(raw)
    assert data["object"] == "text_completion" and data["model"] == "mercury-coder"
    assert [c["text"] for c in data["choices"]] == [expected]
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert headers["x-maskfill-attempts"] == "1" and headers["x-maskfill-replica"]
    # the front's time holds the replica's: the rest of a round trip is Serve's proxy
    assert float(headers["x-maskfill-front-ms"]) >= float(headers["x-maskfill-engine-ms"]) > 0
    status, _, raw = post(cluster, body, "doc-parity")  # no model: the checkpoint's name
    assert json.loads(raw)["model"] == cluster.model.name


def test_stream_true_answers_as_server_sent_events(cluster):
    body = {"prompt": "def add(a, b):\n", "suffix": "\n", "max_tokens": 16}
    _, _, plain = post(cluster, body, "doc-stream")
    status, headers, raw = post(cluster, {**body, "stream": True}, "doc-stream")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in raw.decode().split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    text = json.loads(plain)["choices"][0]["text"]
    assert [e["choices"][0]["text"] for e in events] == [text]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": text}


def test_stream_drafts_come_through_the_cluster(cluster):
    """The replica's partial fills reach the caller through the ingress (a Serve streaming
    handle call) as the shared engine streams them, then the engine's answer."""
    body = {"prompt": "def scale(v, k):\n    ", "suffix": "\n", "max_tokens": 16}
    expected = fim_answer(cluster.model, engine_request(body))
    status, headers, raw = post(cluster, {**body, "stream": True, "stream_drafts": True},
                                "doc-drafts")
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    assert headers["x-maskfill-replica"]
    lines = [ln for ln in raw.decode().split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    drafts = [e for e in events if e["object"] == "text_completion.draft"]
    assert len(drafts) >= 2 and events[: len(drafts)] == drafts, events
    assert [e["object"] for e in events[len(drafts):]] == ["text_completion"]
    assert events[-1]["choices"][0]["text"] == expected
    assert {e["id"] for e in events} == {events[-1]["id"]}
    assert drafts[0]["draft"]["masked"] > drafts[-1]["draft"]["masked"]
    for before, after in zip(drafts, drafts[1:], strict=False):
        assert after["draft"]["step"] > before["draft"]["step"]
        assert after["choices"][0]["text"].startswith(before["choices"][0]["text"])


def test_the_peer_routes_answer_as_on_one_machine(cluster):
    """Continue's and Tabby's /v1/completions and llama.vscode's /infill through the cluster:
    the engine's own answer in each client's shape, streamed as on one machine."""
    prefix, suffix = "def mean(xs):\n    ", "\n"
    expected = fim_answer(cluster.model, CompletionRequest(
        prefix=prefix, suffix=suffix, max_tokens=16, stop="free"))
    body = {"model": "mine", "prompt": prefix, "suffix": suffix, "max_tokens": 16}
    status, headers, raw = post(cluster, body, "doc-peers", path="/v1/completions")
    assert status == 200, raw
    data = json.loads(raw)
    assert data["object"] == "text_completion" and data["model"] == "mine"
    assert [c["text"] for c in data["choices"]] == [expected]
    assert headers["x-maskfill-replica"]

    status, _, raw = post(cluster, {**body, "stream": True,
                                    "stream_options": {"include_usage": True}},
                          "doc-peers", path="/v1/completions")
    lines = [ln.removeprefix("data: ") for ln in raw.decode().split("\n\n") if ln]
    assert status == 200 and lines[-1] == "[DONE]"
    events = [json.loads(ln) for ln in lines[:-1]]
    assert events[0]["choices"][0]["text"] == expected and "delta" not in events[0]["choices"][0]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0

    infill = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 16}
    status, _, raw = post(cluster, infill, "doc-peers", path="/infill")
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["content"] == expected and answer["stop"] is True
    assert answer["tokens_evaluated"] > 0
    status, _, raw = post(cluster, {**infill, "n_predict": 0}, "doc-peers", path="/infill")
    assert status == 200 and json.loads(raw)["content"] == ""  # the warm-up, no model run

    status, _, raw = post(cluster, {**infill, "grammar": "root ::= x"}, path="/infill")
    assert status == 400 and "grammar" in json.loads(raw)["error"]["message"]
    status, _, raw = post(cluster, {**body, "logprobs": 1}, path="/v1/completions")
    assert status == 400 and "logprobs" in json.loads(raw)["error"]["message"]


def test_v1_models_lists_the_model_and_its_window_as_one_engine_does(cluster):
    """The LSP's remote mode and Continue learn the model's name and window here; the entry
    is the shared engine's (peer_api), from an engine replica's loaded model."""
    from engine.engine import Engine

    engine = Engine.load(str(cluster.model))
    try:
        window = engine.info().max_context
    finally:
        engine.close()
    status, raw = get(cluster, "/v1/models")
    assert status == 200, raw
    listing = json.loads(raw)
    assert listing["object"] == "list"
    (entry,) = listing["data"]
    assert entry["object"] == "model" and entry["owned_by"] == "maskfill"
    assert entry["id"] == cluster.model.name  # what answers call it; never the path
    assert entry["max_model_len"] == entry["context_length"] == window
    assert entry["max_tokens"] == min(512, window // 2)
    assert json.loads(post(cluster, body_at(5), "doc-models")[2])["model"] == entry["id"]
    status, raw = get(cluster, f"/v1/models/{entry['id']}")
    assert status == 200 and json.loads(raw) == entry
    status, raw = get(cluster, "/v1/models/no-such-model")
    assert status == 404 and "no-such-model" in json.loads(raw)["error"]["message"]
    status, raw = get(cluster, "/v1/models", token="wrong")
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("payload", "message"), [
    (b"{not json", "bad request body"),
    (b'{"suffix": "x"}', "missing required field `prompt`"),
    (b'{"prompt": "x", "max_tokens": 100000}', "$.max_tokens"),
    (b'{"prompt": "x", "stop": ["a", ""]}', "must not be empty"),
])
def test_bad_bodies_get_a_400_naming_the_problem(cluster, payload, message):
    status, _, raw = post(cluster, payload)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert error["code"] == 400


def test_the_token_is_required_and_oversized_bodies_refused(cluster):
    body = body_at(0)
    for headers in ({"Content-Type": "application/json"},
                    {"Authorization": "Bearer wrong", "Content-Type": "application/json"}):
        status, got, raw = post(cluster, body, headers=headers)
        assert status == 401 and got["www-authenticate"] == "Bearer"
        assert json.loads(raw)["error"]["type"] == "authentication_error"
    status, _, raw = post(cluster, json.dumps({"prompt": "x" * (1024 * 1024)}).encode())
    assert status == 413 and "limit" in json.loads(raw)["error"]["message"]
    assert get(cluster, "/metrics", token=None)[0] == 401


def test_health_needs_no_token_and_metrics_show_each_replica_and_the_sum(cluster):
    status, raw = get(cluster, "/health", token=None)
    assert status == 200 and json.loads(raw)["state"] == "ready"
    for i in range(6):
        assert post(cluster, body_at(i), f"metrics-{i}")[0] == 200
    deadline = time.monotonic() + 20
    while True:  # replicas publish their counters every couple of seconds
        status, raw = get(cluster, "/metrics")
        text = raw.decode()
        per_replica = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                       if line.startswith("maskfill_replica_requests_total")}
        total = metric(text, "maskfill_requests_total", outcome="ok")
        summed = metric(text, "maskfill_replica_requests_total", outcome="ok")
        if (len(per_replica) == 2 and total >= 6) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200 and len(per_replica) == 2
    assert total >= 6 and total == summed
    assert metric(text, "maskfill_cluster_replicas") == 2
    assert metric(text, "maskfill_model_loaded") == 1


def test_a_session_sticks_to_one_replica_and_sessions_use_both(cluster):
    served: dict[str, set[str]] = {}
    for round_ in range(4):
        for s in range(16):
            status, headers, _ = post(cluster, body_at(round_ * 16 + s), f"sticky-{s}")
            assert status == 200
            served.setdefault(f"sticky-{s}", set()).add(headers["x-maskfill-replica"])
    assert all(len(replicas) == 1 for replicas in served.values()), served
    assert len({next(iter(r)) for r in served.values()}) == 2
    # the body field is the same key as the header
    _, by_header, _ = post(cluster, body_at(99), "sticky-3")
    _, by_body, _ = post(cluster, body_at(98, session="sticky-3"))
    assert by_body["x-maskfill-replica"] == by_header["x-maskfill-replica"]


def test_requests_without_a_session_spread_over_the_replicas(cluster):
    replicas = Counter(post(cluster, body_at(200 + i))[1]["x-maskfill-replica"]
                       for i in range(20))
    assert len(replicas) == 2, replicas


def test_a_flooding_session_spills_to_the_other_replica(cluster):
    """12 requests of one session at once (each runs for a while): its home replica passes
    the load bound and the rest go to the other one. The router counts what it sent itself, so
    the bound is reached however late the replicas report their queues (it once failed under
    load when only Serve's queue-length cache, overwritten by those late reports, was read)."""
    replies: list = []
    body = {"prompt": CODE, "suffix": "", "max_tokens": 96}  # long enough to overlap

    def send(i: int) -> None:
        replies.append(post(cluster, {**body, "prompt": f"# {i}\n" + CODE}, "flood"))

    before = get(cluster, "/metrics")[1].decode()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r[0] for r in replies] == [200] * 12
    replicas = Counter(r[1]["x-maskfill-replica"] for r in replies)
    assert len(replicas) == 2, replicas
    after = get(cluster, "/metrics")[1].decode()
    spills = (metric(after, "maskfill_cluster_routed_total", reason="spill")
              - metric(before, "maskfill_cluster_routed_total", reason="spill"))
    assert spills >= 1


def test_one_cluster_serves_two_checkpoints(cluster, tmp_path):
    from ray import serve

    from engine.serve.cluster.app import ClusterOptions, build_app
    from engine.serve.cluster.contract import token_digest
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    options = ClusterOptions(models={"a": str(cluster.model), "b": str(other)},
                             token_digest=token_digest(TOKEN), replicas=1,
                             cpus_per_replica=0.25)
    serve.run(build_app(options), name="multi", route_prefix="/multi")
    try:
        body = {"prompt": "def add(a, b):\n", "suffix": "\n", "max_tokens": 12}
        answers = {}
        for model, path in (("a", cluster.model), ("b", other)):
            status, _, raw = post(cluster, {**body, "model": model}, path="/multi" + FIM)
            assert status == 200, raw
            data = json.loads(raw)
            assert data["model"] == model
            answers[model] = data["choices"][0]["text"]
            assert answers[model] == fim_answer(path, engine_request(body))
        status, _, raw = post(cluster, body, path="/multi" + FIM)  # the first is the default
        assert json.loads(raw)["choices"][0]["text"] == answers["a"]
        status, _, raw = post(cluster, {**body, "model": "c"}, path="/multi" + FIM)
        assert status == 400 and "served: a, b" in json.loads(raw)["error"]["message"]
        status, raw = get(cluster, "/multi/v1/models")  # the names a body's `model` picks
        assert status == 200, raw
        assert [m["id"] for m in json.loads(raw)["data"]] == ["a", "b"]
    finally:
        serve.delete("multi")


def test_a_caller_that_hangs_up_stops_its_job(cluster):
    def cancelled() -> float:
        return metric(get(cluster, "/metrics")[1].decode(), "maskfill_requests_total",
                      outcome="cancelled")

    before = cancelled()
    connection = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=30)
    body = json.dumps({"prompt": "def add(a, b):\n" * 40, "max_tokens": 512}).encode()
    connection.request("POST", FIM, body=body, headers=cluster.headers("hang-up"))
    time.sleep(1.0)  # running on a replica by now
    connection.sock.shutdown(2)
    connection.close()
    deadline = time.monotonic() + 20
    while cancelled() <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cancelled() == before + 1


def test_a_replica_killed_mid_request_is_answered_by_the_other_and_replaced(cluster):
    from ray import serve

    body = {"prompt": "def add(a, b):\n" * 40, "suffix": "\n", "max_tokens": 512}  # seconds
    expected = fim_answer(cluster.model, engine_request(body))
    status, headers, _ = post(cluster, body_at(1), "doomed")
    victim = headers["x-maskfill-replica"]
    pid = replica_pids(cluster.app)[victim]  # the pids the replicas publish
    reply: dict = {}
    thread = threading.Thread(target=lambda: reply.update(r=post(cluster, body, "doomed")))
    thread.start()
    time.sleep(0.5)  # the long request is running on the victim now
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    status, headers, raw = reply["r"]
    assert status == 200, raw
    # a second attempt: the first died with its replica (it had not answered when killed)
    assert headers["x-maskfill-attempts"] == "2" and headers["x-maskfill-replica"] != victim
    assert json.loads(raw)["choices"][0]["text"] == expected  # greedy: the same answer
    for i in range(5):  # the session carries on, on the survivor
        status, headers, _ = post(cluster, body_at(300 + i), "doomed")
        assert status == 200 and headers["x-maskfill-replica"] != victim
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve replaces the dead replica: two answer again
        states = serve.status().applications[cluster.app].deployments["FimEngine"]
        alive = replica_pids(cluster.app) if states.replica_states.get("RUNNING") == 2 else {}
        if len(alive) == 2 and victim not in alive:
            break
        time.sleep(0.5)
    assert len(alive) == 2 and victim not in alive and pid not in alive.values(), alive
