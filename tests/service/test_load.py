"""Fairness and integrity under load on one engine: four socket clients sending requests mixed
with cancellations and same-key supersedes; every answer that is not cancelled is exactly what
that request gets alone (nothing lost or cross-wired). A smaller run of the bench's load test
(engine/bench/shared_engine.py), bounded in count and time."""

from __future__ import annotations

from engine.bench.shared_engine import bench_requests, expected_answers, load_test


def test_four_clients_with_cancellations_lose_and_cross_nothing(memorized_model, serve_engine,
                                                                runtime_dir):
    sock = runtime_dir / "e.sock"
    serve_engine(memorized_model, "--socket", str(sock), "--cache-size", "0")
    requests = bench_requests()
    expected = expected_answers(sock, requests)
    assert len(set(expected)) > 1  # distinct answers, so a cross-wired one would show
    counts = load_test(sock, requests, expected, clients=4, per_client=24, time_limit_s=300)
    assert counts["sent"] == 4 * 24 + 4 * 3  # every 8th request brings a superseded twin
    assert counts["errors"] == counts["lost"] == counts["cross_wired"] == 0
    assert counts["answered"] == counts["sent"]
