"""The cluster's pieces that need no cluster: the session key and seed rules of the HTTP
contract, `maskfill-engine cluster`'s arguments and refusals, and /metrics summing the
replicas' published counters."""

from __future__ import annotations

import msgspec
import pytest

from engine.__main__ import build_parser, main
from engine.api import EngineError
from engine.serve.cluster.cli import build_options, parse_models
from engine.serve.cluster.contract import (
    decode_body,
    pin_seed,
    scheduler_client,
    session_key,
    token_digest,
)
from engine.serve.cluster.metrics import render
from engine.serve.fim_wire import ApiError


def test_session_keys_depend_on_the_token_and_hide_the_document_name():
    a, b = token_digest("team-a"), token_digest("team-b")
    key = session_key(a, "file:///src/app.py")
    assert key == session_key(a, "file:///src/app.py") != session_key(b, "file:///src/app.py")
    assert "app.py" not in key and session_key(a, None) is None and session_key(a, "") is None
    assert scheduler_client(key) < 0 and scheduler_client(None) == -1
    with pytest.raises(ApiError) as caught:
        session_key(a, "x" * 600)
    assert caught.value.status == 400


def test_a_sampled_request_gets_its_seed_before_the_first_try():
    body = decode_body(b'{"prompt": "x", "session": "s", "user": "ignored"}')
    assert body.session == "s" and pin_seed(body) == body  # greedy: deterministic already
    sampled = pin_seed(msgspec.structs.replace(body, temperature=0.7))
    assert isinstance(sampled.seed, int)
    several = pin_seed(msgspec.structs.replace(body, n=3))
    assert several.seed is not None
    seeded = msgspec.structs.replace(body, temperature=0.7, seed=11)
    assert pin_seed(seeded).seed == 11
    with pytest.raises(ApiError):
        decode_body(b'{"prompt": "x", "session": 3}')


def test_models_are_named_or_name_themselves(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert parse_models([str(folder)]) == {str(folder): str(folder)}
    assert parse_models([f"coder={folder}", "small=org/repo"]) == {
        "coder": str(folder), "small": "org/repo"}
    with pytest.raises(EngineError, match="twice"):
        parse_models(["a=x", "a=y"])


def test_options_from_the_command_line(tmp_path):
    args = build_parser().parse_args(
        ["cluster", "--model", f"m={tmp_path}", "--autoscale", "1:6", "--device", "cuda",
         "--gpus-per-replica", "0.5"])
    options = build_options(args, "token")
    assert options.autoscaling.min_replicas == 1 and options.autoscaling.max_replicas == 6
    assert options.device == "cuda" and options.gpus_per_replica == 0.5
    args.autoscale = "6:1"
    with pytest.raises(EngineError, match="MIN:MAX"):
        build_options(args, "token")


@pytest.mark.parametrize(("argv", "message"), [
    (["--http", "0.0.0.0:8000"], "not a loopback address"),
    (["--detach"], "--detach needs --address"),
    (["--direct-ingress", "--haproxy"], "--direct-ingress is the routed topology"),
    (["--direct-ingress", "--http", "127.0.0.1:0"], "needs a fixed --http port"),
])
def test_unsafe_or_impossible_requests_are_refused_before_anything_starts(
        argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MASKFILL_RUNTIME_DIR", str(tmp_path / "rt"))
    assert main(["cluster", "--model", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_metrics_sum_the_replicas_and_show_each():
    row = {"state": "ready", "outcomes": {"ok": 3, "error": 1}, "forward_passes": 30,
           "model_tokens": 40, "warm": 2, "queue_depth": 1,
           "buckets": [(0.01, 1), *[(0, 3)] * 12], "latency_sum_s": 0.3}
    replicas = {"r1": {"models": {"m": row}}, "r2": {"models": {"m": {**row, "warm": 5}}}}
    text = render(replicas, {"retries": 1, "routed": {"home": 4, "spill": 1}}).decode()
    assert 'maskfill_requests_total{outcome="ok"} 6.0' in text
    assert 'maskfill_replica_requests_total{model="m",outcome="ok",replica="r2"} 3.0' in text
    assert "maskfill_warm_requests_total 7.0" in text
    assert "maskfill_request_latency_seconds_count 6.0" in text
    assert 'maskfill_cluster_routed_total{reason="spill"} 1.0' in text
    assert "maskfill_cluster_replicas 2.0" in text
