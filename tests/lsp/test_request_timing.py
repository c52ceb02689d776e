"""The server's own timing of completion requests (issue 23's server overhead): what a request
spent around the engine, kept for the status; the real process is timed in tests/e2e."""

from __future__ import annotations

import time

from lsp_server import request_timing
from lsp_server.request_timing import KEEP, MAX_OPEN, RequestTimings, timed_in_thread


def test_a_request_is_timed_from_its_read_to_its_answer_minus_the_engine():
    timings = RequestTimings()
    timing = timings.begin(7, "textDocument/inlineCompletion", time.perf_counter(),
                           time.thread_time())
    token = request_timing.current.set(timing)
    try:
        request_timing.engine_ran(5.0)
        request_timing.engine_ran(None)  # a run with no time: nothing added
        assert timed_in_thread(timing, sum, [1, 2]) == 3
    finally:
        request_timing.current.reset(token)
    request_timing.engine_ran(9.0)  # outside any request: ignored
    timings.end(7)
    timings.end(7)  # answered once: a second end records nothing
    [done] = timings.recent
    assert done["method"] == "textDocument/inlineCompletion" and done["engineMs"] == 5.0
    assert done["wallMs"] >= 0 and abs(done["overheadMs"] - (done["wallMs"] - 5.0)) < 0.01
    assert done["loopCpuMs"] >= 0 and done["offloadedCpuMs"] >= 0
    assert not timings.open


def test_the_status_keeps_the_last_requests_and_forgets_unanswered_ones():
    timings = RequestTimings()
    for msg_id in range(KEEP + 5):
        timings.begin(msg_id, "textDocument/completion", time.perf_counter(), time.thread_time())
        timings.end(msg_id)
    assert len(timings.recent) == KEEP and timings.recent[-1]["engineMs"] is None
    for msg_id in range(MAX_OPEN + 3):  # never answered (the answer went another way)
        timings.begin(f"lost-{msg_id}", "textDocument/completion", 0.0, 0.0)
    assert len(timings.open) == MAX_OPEN and "lost-0" not in timings.open
