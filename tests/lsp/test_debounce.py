"""Newest-wins per document and the adaptive debounce (asyncio side)."""

import asyncio

import pytest

from lsp_server.debounce import AdaptiveDebounce, LatestPerDocument


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_debounce_first_request_waits_the_minimum():
    debounce = AdaptiveDebounce(75, 400, clock=FakeClock())
    assert debounce.delay_ms("u") == 75


def test_debounce_follows_a_fast_typists_gap():
    clock = FakeClock()
    debounce = AdaptiveDebounce(75, 400, clock=clock)
    for _ in range(10):
        debounce.delay_ms("u")
        clock.now += 0.120  # a keystroke every 120 ms
    assert debounce.delay_ms("u") == pytest.approx(120 * AdaptiveDebounce.MARGIN)


def test_debounce_for_slow_typing_is_the_minimum():
    clock = FakeClock()
    debounce = AdaptiveDebounce(75, 400, clock=clock)
    for _ in range(5):
        debounce.delay_ms("u")
        clock.now += 0.9  # slower than the maximum wait: waiting saves nothing
    assert debounce.delay_ms("u") == 75


def test_debounce_pause_resets_and_documents_are_separate():
    clock = FakeClock()
    debounce = AdaptiveDebounce(75, 400, clock=clock)
    for _ in range(5):
        debounce.delay_ms("u")
        clock.now += 0.2
    clock.now += 10  # a pause
    assert debounce.delay_ms("u") == 75
    assert debounce.delay_ms("other") == 75


def test_debounce_swapped_bounds_are_ordered():
    debounce = AdaptiveDebounce(400, 75)
    assert (debounce.min_ms, debounce.max_ms) == (75, 400)


async def test_newer_request_supersedes_the_older_one_for_the_same_document():
    latest = LatestPerDocument()
    first = latest.begin("a")
    other = latest.begin("b")
    second = latest.begin("a")
    assert first.superseded.is_set()
    assert not other.superseded.is_set() and not second.superseded.is_set()
    assert not latest.is_latest(first) and latest.is_latest(second)
    latest.end(first)  # ending a superseded ticket leaves the newest in place
    assert latest.is_latest(second)
    assert latest.superseded == 1


async def test_wait_superseded_wakes_early():
    latest = LatestPerDocument()
    first = latest.begin("a")
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, latest.begin, "a")
    assert await first.wait_superseded(30.0) is True
    second = latest.begin("b")
    assert await second.wait_superseded(0.01) is False
