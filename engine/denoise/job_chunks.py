"""A request bigger than its share of the shared batch, run as a string of smaller jobs.

The worker (engine/denoise/batch_worker.py) admits requests between passes while the rows in flight
fit its row budget. A request with more rows than that (n=8 candidates of 180 tokens: 8 x 5 hole
lengths = 40 rows on the CPU's 32) used to run alone, and every other request waited for its
last step. Instead its rows are split into chunks of at most `max_rows` (a share of the budget
that leaves room beside it) which run one after another: each chunk joins the back of the
queue, so requests that came meanwhile go first and share the passes of the next chunk. The
rows of a request are independent holes over one context, so the chunks' results are simply
stacked back in row order; the later chunks find the context in the context cache.

Chunking depends only on the request and the budget, never on the load, so a request gets the
same answer alone or beside others. Chunk k > 0 draws from seed + k (its own generator), so a
seeded request stays reproducible.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.denoise.fim import InfillBatch
from engine.denoise.loop import Denoised, DenoiseJob

SEED_MODULUS = 1 << 64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def chunk_sizes(rows: int, max_rows: int) -> list[int]:
    """Near-equal chunks of at most max_rows (40 rows, 24 at most: 20 + 20)."""
    count = -(-rows // max(1, max_rows))
    return [rows // count + (1 if i < rows % count else 0) for i in range(count)]


def select_rows(batch: InfillBatch, start: int, stop: int) -> InfillBatch:
    """Rows start..stop-1 of `batch`, its padding and hole columns cut to those rows' own."""
    lengths = batch.hole_lengths[start:stop]
    width = int(batch.key_valid[start:stop].sum(dim=1).max())
    return replace(batch, ids=batch.ids[start:stop, :width].clone(),
                   positions=batch.positions[start:stop, :width].clone(),
                   key_valid=batch.key_valid[start:stop, :width].clone(),
                   hole_lengths=list(lengths),
                   hole_valid=batch.hole_valid[start:stop, :max(lengths)].clone())


def split_job(job: DenoiseJob, max_rows: int) -> list[DenoiseJob]:
    """The chunks of `job` in row order (the job itself when it fits)."""
    if job.rows <= max_rows:
        return [job]
    chunks, start = [], 0
    for index, size in enumerate(chunk_sizes(job.rows, max_rows)):
        chunks.append(replace(
            job, batch=select_rows(job.batch, start, start + size),
            temperatures=job.temperatures[start:start + size],
            seed=(job.seed + index) % SEED_MODULUS))
        start += size
    return chunks


def merge(job: DenoiseJob, parts: list[Denoised], mask_id: int) -> Denoised:
    """One result for all of `job`'s rows from its chunks' results, in order; rows of chunks
    that never ran (the request was cancelled or timed out first) stay masked: nothing
    committed, so they decode to nothing."""
    rows, lmax = job.rows, job.batch.max_hole
    hole = torch.full((rows, lmax), mask_id, dtype=torch.long)
    confidence = torch.zeros((rows, lmax))
    forced = torch.zeros((rows, lmax), dtype=torch.bool)
    commits: list[list[int]] = [[] for _ in range(rows)]
    start = 0
    for part in parts:
        n, width = part.hole.shape
        hole[start:start + n, :width] = part.hole
        confidence[start:start + n, :width] = part.confidence
        forced[start:start + n, :width] = part.forced
        commits[start:start + n] = part.commits or [[] for _ in range(n)]
        start += n
    out = Denoised(hole=hole, confidence=confidence, forced=forced, commits=commits)
    for part in parts:
        out.forward_passes += part.forward_passes
        out.encode_ms += part.encode_ms
        out.denoise_ms += part.denoise_ms
        out.cancelled |= part.cancelled
        out.timed_out |= part.timed_out
        out.batch_rows = max(out.batch_rows, part.batch_rows)
    if parts:
        out.reused_tokens = parts[0].reused_tokens
        out.speculative_hit = parts[0].speculative_hit
    out.timed_out = out.timed_out and not out.cancelled
    return out
