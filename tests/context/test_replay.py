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


def _timed_gathers(stable, clock) -> list[tuple[float, int]]:
    """(virtual moment, cursor offset) of each gathering the block does from now on."""
    moments: list[tuple[float, int]] = []
    gather = stable.gatherer.gather

    def timed(uri, text, offset, *args, **kwargs):
        moments.append((clock.now(), offset))
        return gather(uri, text, offset, *args, **kwargs)

    stable.gatherer.gather = timed
    return moments


def _timers_run(clock) -> list[int]:
    """Which of the timers armed on `clock` from now on ran (their order of arming)."""
    ran: list[int] = []
    after = clock.after

    def counted(delay, action):
        index = counted.armed
        counted.armed += 1
        return after(delay, lambda: (ran.append(index), action()))

    counted.armed = 0
    clock.after = counted
    return ran


def test_a_pause_past_the_idle_rule_re_gathers_at_the_virtual_moment_of_the_request():
    clock = VirtualTime(PrewarmRecorder())
    decorate, _, _, stable = decorator(128, None, clock)  # no engine: no idle pre-warm
    gathered = _timed_gathers(stable, clock)
    request, text, offset = _at_cursor(10)
    clock.sleep_until(1.0)
    assert decorate(request, text, offset).extra  # the first request gathers the block
    clock.sleep_until(1.0 + IDLE_S / 2)
    decorate(request, text, offset)
    assert gathered == [(1.0, offset)]  # within the idle rule, same line: the block is kept
    later = 1.0 + IDLE_S / 2 + IDLE_S + 0.25
    clock.sleep_until(later)  # no wall time passes: only the virtual clock moved
    decorate(request, text, offset)
    assert gathered == [(1.0, offset), (later, offset)]


def test_the_idle_pre_warm_runs_at_its_virtual_moment_and_a_request_cancels_it():
    engine = PrewarmRecorder()
    clock = VirtualTime(engine)
    decorate, _, _, stable = decorator(128, engine, clock)
    gathered = _timed_gathers(stable, clock)
    timers_run = _timers_run(clock)
    first, first_text, first_offset = _at_cursor(10)
    second, second_text, second_offset = _at_cursor(11)
    clock.sleep_until(2.0)
    decorate(first, first_text, first_offset)  # arms timer 0, for the first request
    clock.sleep_until(2.0 + IDLE_S / 2)
    decorate(second, second_text, second_offset)  # cancels timer 0, arms timer 1
    clock.sleep_until(2.0 + IDLE_S / 2 + IDLE_S - 0.05)
    assert gathered == [(2.0, first_offset)]
    clock.sleep_until(10.0)
    assert timers_run == [1]  # the cancelled timer never ran
    # the second request's timer re-gathered once, at its cursor, at the moment the idle
    # rule allowed (+ 10 ms)
    assert len(gathered) == 2 and gathered[1][1] == second_offset
    assert gathered[1][0] == pytest.approx(2.0 + IDLE_S / 2 + IDLE_S + 0.01)
    assert clock.now() == 10.0


def test_a_keystroke_without_a_request_holds_the_idle_pre_warm_back():
    """As the server's didChange: a keystroke restarts the block's idle clock and re-arms the
    pre-warm, and one typed after the last request leaves the block to the next request (the
    replay used to re-gather at the stale cursor 1 s after that request, mid-typing)."""
    engine = PrewarmRecorder()
    clock = VirtualTime(engine)
    decorate, keyed, _, stable = decorator(128, engine, clock)
    gathered = _timed_gathers(stable, clock)
    request, text, offset = _at_cursor(10)
    typed_on = text[:offset] + " " + text[offset:]
    clock.sleep_until(2.0)
    keyed(text, offset)
    decorate(request, text, offset)
    clock.sleep_until(2.0 + IDLE_S * 0.9)
    keyed(typed_on, offset + 1)  # no request: the next key came before its debounce ended
    clock.sleep_until(10.0)
    assert gathered == [(2.0, offset)]
    assert engine.prewarms == []


def test_a_keystroke_postpones_the_idle_pre_warm_to_a_full_pause_after_it():
    engine = PrewarmRecorder()
    clock = VirtualTime(engine)
    decorate, keyed, _, stable = decorator(128, engine, clock)
    gathered = _timed_gathers(stable, clock)
    request, text, offset = _at_cursor(10)
    clock.sleep_until(2.0)
    decorate(request, text, offset)
    clock.sleep_until(2.0 + IDLE_S * 0.9)
    keyed(text, offset)  # the same text (say a key undone): the pause starts again here
    clock.sleep_until(2.0 + IDLE_S * 0.9 + IDLE_S - 0.05)
    assert gathered == [(2.0, offset)]
    clock.sleep_until(10.0)
    assert [moment for moment, _ in gathered] == pytest.approx(
        [2.0, 2.0 + IDLE_S * 0.9 + IDLE_S + 0.01])


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


class NeverSettles(PrewarmRecorder):
    def wait_idle(self, timeout: float = 30.0) -> bool:
        return False


def test_the_virtual_clock_stops_when_the_engine_does_not_settle():
    """A deterministic run must not race background work: an engine still busy after a timer's
    action is an error, not a figure."""
    clock = VirtualTime(NeverSettles())
    ran: list[float] = []
    clock.after(0.5, lambda: ran.append(clock.now()))
    with pytest.raises(RuntimeError, match="background work"):
        clock.sleep_until(1.0)
    assert ran == [0.5]
