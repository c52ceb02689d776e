"""The keystroke replay with the stable block (lsp_server/context/replay.py) on the virtual
clock: the same figures every run, and the block's idle rule on the replay's time."""

from __future__ import annotations

import pytest

from engine.bench.keystroke_replay import SOURCE, TYPED_FROM, VirtualTime, request_at
from engine.model.embedded_model import default_model_path
from lsp_server.context.gatherer import IDLE_S
from lsp_server.context.replay import decorator, replay_once


class PrewarmRecorder:
    """Takes the pre-warms the idle timer hands over (no model: what is tested is when the
    block is re-gathered, not what the engine makes of it)."""

    def __init__(self) -> None:
        self.prewarms: list = []

    def prewarm(self, request) -> bool:
        self.prewarms.append(request)
        return True

    def wait_idle(self, timeout: float = 30.0) -> bool:
        return True


def _at_cursor(chars: int):
    source = SOURCE.read_text(encoding="utf-8")
    offset = source.index(TYPED_FROM) + chars
    return request_at(source, offset), source, offset


def _timed_gathers(stable, clock) -> list[float]:
    moments: list[float] = []
    gather = stable.gatherer.gather

    def timed(*args, **kwargs):
        moments.append(clock.now())
        return gather(*args, **kwargs)

    stable.gatherer.gather = timed
    return moments


def test_a_pause_past_the_idle_rule_re_gathers_at_the_virtual_moment_of_the_request():
    clock = VirtualTime(PrewarmRecorder())
    decorate, _, stable = decorator(128, None, clock)  # no engine: no idle pre-warm
    gathered = _timed_gathers(stable, clock)
    request, text, offset = _at_cursor(10)
    clock.sleep_until(1.0)
    assert decorate(request, text, offset).extra  # the first request gathers the block
    clock.sleep_until(1.0 + IDLE_S / 2)
    decorate(request, text, offset)
    assert gathered == [1.0]  # within the idle rule, same line: the block is kept
    later = 1.0 + IDLE_S / 2 + IDLE_S + 0.25
    clock.sleep_until(later)  # no wall time passes: only the virtual clock moved
    decorate(request, text, offset)
    assert gathered == [1.0, later]


def test_the_idle_pre_warm_runs_at_its_virtual_moment_and_a_request_cancels_it():
    engine = PrewarmRecorder()
    clock = VirtualTime(engine)
    decorate, _, stable = decorator(128, engine, clock)
    gathered = _timed_gathers(stable, clock)
    request, text, offset = _at_cursor(10)
    clock.sleep_until(2.0)
    decorate(request, text, offset)
    clock.sleep_until(2.0 + IDLE_S / 2)
    decorate(request, text, offset)  # restarts the idle clock: the first timer is moot
    clock.sleep_until(2.0 + IDLE_S / 2 + IDLE_S - 0.05)
    assert gathered == [2.0]
    clock.sleep_until(10.0)
    # the pending pre-warm re-gathered once, at the moment the idle rule allowed (+ 10 ms)
    assert gathered[0] == 2.0 and len(gathered) == 2
    assert gathered[1] == pytest.approx(2.0 + IDLE_S / 2 + IDLE_S + 0.01)
    assert clock.now() == 10.0


@pytest.mark.skipif(default_model_path() is None, reason="no embedded model in this install")
def test_the_deterministic_replay_gives_the_same_figures_twice():
    """On the virtual clock every request that reaches the engine runs to completion and the
    idle pre-warm runs at its virtual moment: two runs, the same reuse per request."""
    runs = []
    for _ in range(2):
        log: list = []
        out = replay_once("with", chars=40, deterministic=True, log=log)
        runs.append((out, [(item.at, item.reused, item.stats.prefix_tokens,
                            item.stats.suffix_tokens, item.cancelled) for item in log]))
    (first, first_log), (second, second_log) = runs
    assert first_log == second_log
    assert first["replay_requests"] == first["replay_reached"] == len(first_log) >= 3
    assert first["replay_cancelled"] == 0
    for key in ("reuse_hit_rate", "reuse_token_share", "replay_requests"):
        assert first[key] == second[key], key
    for key, value in first["block"].items():  # (the gathering's wall time is no figure)
        assert key.startswith("context_ms") or second["block"][key] == value, key
    assert first["reuse_hit_rate"] > 0  # the later requests reuse the first one's context
