"""A real source file typed character by character through the engine, as an editor would.

Lines of one of the engine's own source files are deleted and typed back one key at a time in
real time (seeded human-like gaps: ~120 ms between keys, longer pauses at line ends and now
and then). Each keystroke is one automatic completion request, shaped like the server's: a
context window of whole lines around the cursor, the `auto` stop mode at the cursor, 32 tokens,
greedy. The server's policy is replayed too (lsp_server/debounce.py, restated here because the
engine never imports LSP code): a keystroke cancels the request in flight for the document
(newest wins), and a request waits an adaptive debounce first, so keys typed faster than that
never reach the engine.

Reported: requests that reached the engine, how many were cancelled, the share that reused a
cached context (`reuse_hit_rate`), the latency p50 of the cold and of the warm ones that
completed (and how many each p50 rests on), how many worn reuse chains the engine re-encoded in
the background (`replay_refreshes`, engine/denoise/context_refresh.py), and the accept scenario (a
completion accepted, then the next request): how often the context prepared "as if accepted" is
hit, and that request's latency.

The real-time cold and warm p50s compare *different* requests: a few cold ones (the first, or
after a pause or a worn chain) against the warm rest, with different pass counts, some sharing
the model with a request just superseded or with background work; warm came out above cold in
one `make bench` (docs/LOG.md, 2026-12-06). What reuse buys is `paired`: the same requests, in
typing order, each timed on an engine that reuses contexts and on one that never does.

Two clocks drive the same replay (`replay(clock=...)`): `RealTime` (the default) types in real
time, and requests run beside the typing and are cancelled by the next keystroke, so the figures
depend on the machine's load (a request cancelled while it waits reaches no model: counted in
`replay_requests`, not in `replay_reached`). `VirtualTime` is deterministic: the same keystrokes
and debounce decisions on a virtual clock; each request that reaches the engine runs to
completion, then the engine settles (`wait_idle`: speculation, refresh), and timers the caller
armed on the clock (`after`: the server's idle pre-warm, lsp_server/context/replay.py) run at
their virtual moment, each followed by `wait_idle`. The same seed gives the same figures.
`reuse_hit_rate` counts a request as a hit when it reused cached context (reused context tokens
> 0), over the requests that reached the model (`replay_reached`: every request, in virtual
time); `reuse_hit_rate_sent` is over every request sent (one cancelled while it waited, or
that failed, counts as a miss), and `reuse_token_share` is the reused share of the context
tokens of the requests that reached the model.
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.api import CompletionRequest, CompletionStats
from engine.stop import stop_for_cursor

SOURCE = Path(__file__).resolve().parents[1] / "denoise" / "fim.py"
TYPED_FROM = "def precut_text("  # the function whose lines are typed back
TYPED_CHARS = 150
LINES_BEFORE, LINES_AFTER = 200, 60  # the server's context window defaults
MAX_TOKENS = 32
# AdaptiveDebounce defaults (lsp_server/settings.py, lsp_server/debounce.py)
DEBOUNCE_MIN_MS, DEBOUNCE_MAX_MS, PAUSE_S, SMOOTHING, MARGIN = 75.0, 400.0, 2.0, 0.3, 1.25


@dataclass
class Sent:
    at: float  # seconds into the replay
    request: CompletionRequest
    cancel: threading.Event
    ms: float | None = None
    reused: int = 0
    cancelled: bool = False
    error: str | None = None
    stats: CompletionStats | None = None

    @property
    def reached(self) -> bool:
        """It reached the model (its context was filled, warm or cold): the engine times the
        encode of such a request only. One cancelled while it waited, or during a cold
        encode, did not (reports no reuse)."""
        return self.stats is not None and "encode" in self.stats.timings_ms


class RealTime:
    """The wall clock: sleeping sleeps, timers are threads (the real-time replay)."""

    virtual = False

    def __init__(self) -> None:
        self._began = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._began

    def sleep_until(self, moment: float) -> None:
        time.sleep(max(0.0, moment - self.now()))

    def after(self, delay: float, action: Callable[[], None]):
        """Run `action` in `delay` s on a thread; the handle's cancel() stops it."""
        timer = threading.Timer(delay, action)
        timer.daemon = True
        timer.start()
        return timer


class _Timer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualTime:
    """A virtual clock for the deterministic replay: time moves only when the replay sleeps,
    and a timer runs (on the replay's thread) when the clock passes its moment, then the
    engine settles, so what it hands the engine is done before the next request."""

    virtual = True

    def __init__(self, engine) -> None:
        self._engine = engine
        self._now = 0.0
        self._timers: list[tuple[float, int, _Timer, Callable[[], None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def sleep_until(self, moment: float) -> None:
        while self._timers and self._timers[0][0] <= moment:
            at, _, handle, action = heapq.heappop(self._timers)
            if handle.cancelled:
                continue
            self._now = max(self._now, at)
            action()
            settle(self._engine)
        self._now = max(self._now, moment)

    def after(self, delay: float, action: Callable[[], None]) -> _Timer:
        handle = _Timer()
        heapq.heappush(self._timers, (self._now + delay, next(self._order), handle, action))
        return handle


SETTLE_S = 120.0  # a hang guard: the embedded model's background work takes seconds


def settle(engine) -> None:
    """Wait for the engine's background work (speculation, refresh) to end. The virtual
    clock's determinism rests on it: a run that went on while that work still ran would race
    it, so one that does not end within SETTLE_S stops the replay with an error."""
    if not engine.wait_idle(SETTLE_S):
        raise RuntimeError(f"the deterministic replay's engine still had background work after "
                           f"{SETTLE_S:.0f} s: its figures would depend on timing, so none "
                           f"are given")


def keystroke_gaps(n: int, text: str, seed: int = 7) -> list[float]:
    """Seconds before each key: lognormal around 120 ms, a pause after a line and every so
    often (the user reads the suggestion, thinks)."""
    rng = random.Random(seed)
    gaps = []
    for i in range(n):
        gap = min(0.6, rng.lognormvariate(-2.1, 0.35))
        if i and text[i - 1] == "\n":
            gap += 0.7
        elif rng.random() < 0.04:
            gap += 0.5
        gaps.append(gap)
    return gaps


class Debounce:
    """The server's AdaptiveDebounce for one document, on the replay's clock."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.typical: float | None = None

    def delay_ms(self, now: float) -> float:
        if self.last is not None:
            gap_ms = (now - self.last) * 1000
            if gap_ms > PAUSE_S * 1000:
                self.typical = None
            else:
                previous = gap_ms if self.typical is None else self.typical
                self.typical = SMOOTHING * gap_ms + (1 - SMOOTHING) * previous
        self.last = now
        if self.typical is None:
            return DEBOUNCE_MIN_MS
        wanted = self.typical * MARGIN
        return max(DEBOUNCE_MIN_MS, wanted) if wanted <= DEBOUNCE_MAX_MS else DEBOUNCE_MIN_MS


def window(text: str, offset: int) -> tuple[str, str]:
    """Whole lines around the cursor, as the server's context_window takes them (the engine
    then cuts them to the model's window)."""
    start = text.rfind("\n", 0, offset) + 1  # the cursor line's own beginning
    for _ in range(LINES_BEFORE):
        if start == 0:
            break
        start = text.rfind("\n", 0, start - 1) + 1
    found = text.find("\n", offset)
    end = len(text) if found == -1 else found + 1
    for _ in range(LINES_AFTER):
        if end >= len(text):
            break
        found = text.find("\n", end)
        end = len(text) if found == -1 else found + 1
    return text[start:offset], text[offset:end]


def request_at(text: str, offset: int) -> CompletionRequest:
    prefix, suffix = window(text, offset)
    stop = stop_for_cursor(prefix.rsplit("\n", 1)[-1], suffix.split("\n", 1)[0])
    return CompletionRequest(prefix=prefix, suffix=suffix, max_tokens=MAX_TOKENS, stop=stop)


def sent_keys(typed: str, seed: int = 7) -> list[tuple[float, float | None]]:
    """For each key of `typed`: (the moment it is typed, the moment its request is sent, or
    None when the next key comes first and the server never sends it). Seconds into the
    replay; the same for both clocks."""
    gaps = keystroke_gaps(len(typed), typed, seed)
    debounce = Debounce()
    keys = []
    clock = 0.0
    for i in range(len(typed)):
        clock += gaps[i]
        delay = debounce.delay_ms(clock) / 1000.0
        next_key = clock + gaps[i + 1] if i + 1 < len(typed) else float("inf")
        keys.append((clock, None if next_key <= clock + delay else clock + delay))
    return keys


def replay(engine, chars: int = TYPED_CHARS,
           sent_requests: list[CompletionRequest] | None = None,
           decorate: Callable[[CompletionRequest, str, int], CompletionRequest] | None = None,
           seed: int = 7, clock: RealTime | VirtualTime | None = None,
           log: list[Sent] | None = None,
           keyed: Callable[[str, int], None] | None = None) -> dict:
    """Type `chars` characters of SOURCE back (keystroke gaps from `seed`) on `clock`
    (RealTime by default; VirtualTime: deterministic, module doc); the figures above.
    `sent_requests`, when given, receives every request sent, in order (for `paired`).
    `decorate` (request, document text, cursor offset) -> the request to send: the LSP side
    adds its extra context with it (lsp_server/context/replay.py), on the same `clock`.
    `keyed` (document text, cursor offset) is called at every keystroke, before its request
    if it sends one (the server's didChange). `log` receives every request sent, with its
    outcome."""
    clock = clock or RealTime()
    source = SOURCE.read_text(encoding="utf-8")
    start = source.index(TYPED_FROM)
    typed = source[start:start + chars]
    before, after = source[:start], source[start + chars:]
    sent: list[Sent] = []
    threads: list[threading.Thread] = []
    refreshes_before = engine.context_stats().get("refreshes", 0)

    def run(item: Sent) -> None:
        t0 = time.perf_counter()
        try:
            result = engine.complete(item.request, cancel=item.cancel)
        except Exception as error:  # noqa: BLE001 - reported, not raised, by the bench
            item.error = f"{type(error).__name__}: {error}"
            return
        item.ms = (time.perf_counter() - t0) * 1000.0
        item.cancelled = result.stats.cancelled
        item.reused = result.stats.reused_context_tokens
        item.stats = result.stats

    for i, (key_at, send_at) in enumerate(sent_keys(typed, seed)):
        clock.sleep_until(key_at)
        if sent:
            sent[-1].cancel.set()  # this keystroke supersedes the request in flight
        text = before + typed[:i + 1] + after
        if keyed is not None:
            keyed(text, len(before) + i + 1)
        if send_at is None:
            continue  # the next key arrives first: the server never sends this one
        clock.sleep_until(send_at)
        request = request_at(text, len(before) + i + 1)
        if decorate is not None:
            request = decorate(request, text, len(before) + i + 1)
        item = Sent(at=send_at, request=request, cancel=threading.Event())
        sent.append(item)
        if clock.virtual:  # to completion, then the engine settles (speculation, refresh)
            run(item)
            settle(engine)
            continue
        thread = threading.Thread(target=run, args=(item,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(60.0)
    if clock.virtual:
        settle(engine)  # a refresh the last request left counts too
    else:
        engine.wait_idle()
    if sent_requests is not None:
        sent_requests.extend(s.request for s in sent)
    if log is not None:
        log.extend(sent)
    done = [s for s in sent if s.ms is not None and not s.cancelled]
    warm = [s.ms for s in done if s.reused]
    cold = [s.ms for s in done if not s.reused]
    into_model = [s for s in sent if s.reached]
    return {
        "replay_keystrokes": len(typed),
        "replay_requests": len(sent),
        "replay_reached": len(into_model),
        "replay_cancelled": sum(s.cancelled for s in sent),
        "replay_completed": len(done),
        "reuse_hit_rate": sum(1 for s in into_model if s.reused) / max(len(into_model), 1),
        "reuse_hit_rate_sent": sum(1 for s in sent if s.reused) / max(len(sent), 1),
        # how much of those requests' context came from the cache (a hit may reuse a little)
        "reuse_token_share": sum(s.reused for s in into_model) / max(
            sum(s.stats.prefix_tokens + s.stats.suffix_tokens for s in into_model), 1),
        "replay_cold_ms_p50": statistics.median(cold) if cold else None,
        "replay_warm_ms_p50": statistics.median(warm) if warm else None,
        "replay_cold_completed": len(cold),  # what each p50 rests on
        "replay_warm_completed": len(warm),
        # different requests, different work: passes dominate this model's requests
        "replay_cold_passes_p50": passes_p50([s for s in done if not s.reused]),
        "replay_warm_passes_p50": passes_p50([s for s in done if s.reused]),
        "replay_errors": sum(s.error is not None for s in sent),
        "replay_refreshes": engine.context_stats().get("refreshes", 0) - refreshes_before,
    }


def passes_p50(items: list[Sent]) -> float | None:
    passes = [s.stats.forward_passes for s in items if s.stats is not None]
    return statistics.median(passes) if passes else None


def paired(warm_engine, cold_engine, requests: list[CompletionRequest]) -> dict:
    """Each request timed on both engines back to back (alternating which goes first), so a
    pair shares the machine's load. Every request completes and the engine settles before the
    next (background refresh and speculation done, as in a pause between keys), so each warm
    request follows its predecessor's context; the cold engine has context reuse off. The
    first request has no predecessor and is left out."""
    rows = []
    for index, request in enumerate(requests):
        order = (warm_engine, cold_engine) if index % 2 == 0 else (cold_engine, warm_engine)
        timed = {}
        for engine in order:
            started = time.perf_counter()
            result = engine.complete(request)
            timed[id(engine)] = ((time.perf_counter() - started) * 1000.0, result)
            engine.wait_idle()
        if index:
            rows.append((timed[id(warm_engine)], timed[id(cold_engine)]))
    if not rows:
        return {}

    def p50(values) -> float:
        return statistics.median(values)

    warm = [w for (w, _), _ in rows]
    cold = [c for _, (c, _) in rows]
    encode = [(w.stats.timings_ms["encode"], c.stats.timings_ms["encode"])
              for (_, w), (_, c) in rows]
    return {
        "replay_paired_requests": len(rows),
        "replay_paired_warm_rate": sum((w.stats.reused_context_tokens > 0)
                                       for (_, w), _ in rows) / len(rows),
        "replay_paired_cold_ms_p50": p50(cold),
        "replay_paired_warm_ms_p50": p50(warm),
        "replay_paired_speedup_p50": p50([c / w for w, c in zip(warm, cold, strict=True)]),
        "replay_paired_cold_encode_ms_p50": p50([c for _, c in encode]),
        "replay_paired_warm_encode_ms_p50": p50([w for w, _ in encode]),
        # the reused context is an approximation: how often the text is the cold one's
        "replay_paired_same_text": sum(w.text == c.text for (_, w), (_, c) in rows) / len(rows),
    }


def accept_scenario(engine, tries: int = 8) -> dict:
    """A completion is shown, accepted (inserted), and the next request follows at the new
    cursor: with the speculative context ready, that request starts warm."""
    source = SOURCE.read_text(encoding="utf-8")
    lines = [i for i, ch in enumerate(source) if ch == "\n"]
    hits = warm = 0
    latencies = []
    for k in range(tries):
        offset = lines[(k + 1) * len(lines) // (tries + 2)]  # the end of a line
        first = engine.complete(request_at(source, offset))
        if not first.text:
            continue
        engine.wait_idle()  # a user takes longer than one pass to press Tab
        accepted = source[:offset] + first.text + source[offset:]
        started = time.perf_counter()
        after = engine.complete(request_at(accepted, offset + len(first.text)))
        latencies.append((time.perf_counter() - started) * 1000.0)
        hits += after.stats.speculative_hit
        warm += after.stats.reused_context_tokens > 0
    n = max(len(latencies), 1)
    return {"accept_tries": len(latencies), "accept_speculative_hit_rate": hits / n,
            "accept_warm_rate": warm / n,
            "accept_next_ms_p50": statistics.median(latencies) if latencies else None}
