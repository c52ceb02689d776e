"""Through the in-process worker, different documents' requests share the real engine's
denoising passes (issue 13 item 2) and each still gets what it gets alone."""

from __future__ import annotations

from engine.api import CompletionRequest
from lsp_server.engine_host import LoadSpec, LspEngineHost, load_engine
from tests.engine.test_batching import Gate, own_rows
from tests.fixtures.memorized import SNIPPETS, split_middle
from tests.waiting import wait_until


def fill_requests(tokenizer) -> list[CompletionRequest]:
    """The middle half of two memorized functions, one hole length each."""
    made = []
    for snippet in SNIPPETS[:2]:
        n = len(tokenizer.encode(snippet))
        prefix, middle, suffix = split_middle(tokenizer, snippet, n // 4, 3 * n // 4)
        span = len(tokenizer.encode(middle))
        made.append(CompletionRequest(prefix=prefix, suffix=suffix, span_lengths=(span,),
                                      max_tokens=span, stop="free"))
    return made


def test_two_documents_share_denoising_passes(memorized_model):
    engines = []

    def loader(spec):  # the real loader, keeping the engine to hold its pass loop below
        engines.append(load_engine(spec))
        return engines[-1]

    worker = LspEngineHost(loader)
    try:
        worker.load(LoadSpec(model=str(memorized_model), context_reuse=False))
        wait_until(lambda: worker.state in ("ready", "failed"), timeout=120)
        assert worker.ready, worker.error
        (engine,) = engines
        assert engine.concurrent_calls
        requests = fill_requests(engine.tokenizer)
        alone = [worker.submit(f"file:///{i}.py", r).future.result(60)
                 for i, r in enumerate(requests)]
        assert [a.stats.batch_rows for a in alone] == [own_rows(r) for r in requests]

        assert engine.wait_idle()
        gate = Gate(engine)  # holds the pass loop so that both requests are admitted together
        jobs = [worker.submit(f"file:///{i}.py", r) for i, r in enumerate(requests)]
        wait_until(lambda: len(engine._worker._waiting) == len(requests), timeout=60)
        gate.release()
        together = [job.future.result(60) for job in jobs]

        rows = sum(own_rows(r) for r in requests)
        assert [t.stats.batch_rows for t in together] == [rows] * len(requests)
        assert [t.text for t in together] == [a.text for a in alone]
        assert all(t.text for t in together)  # the memorized middles, not empty answers
        status = worker.stats.snapshot()
        assert status["peakJobsInFlight"] == len(requests) and status["peakBatchRows"] == rows
    finally:
        worker.close()
