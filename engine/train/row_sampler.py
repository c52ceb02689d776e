"""Training rows cut from the pre-tokenized corpus (engine/train/token_corpus.py) by index
arithmetic.

Two kinds of rows, every row exactly its batch's length (no attention mask is needed, so a GPU
runs flash attention; short files are followed by EOS that is attended but never a target):
- plain rows: `[BOS] window [EOS]`, the window starting at a line and lying inside one file where
  the file is long enough; every window token is maskable.
- infill rows, laid out exactly as the engine's infill prompt:
  `[BOS] prefix middle EOS*pad suffix [EOS]`, with only the hole (middle + its EOS padding, 8/16/32/
  64 slots like the engine's span buckets) maskable. The middle is one whole line (half of the
  rows), a few whole lines, the rest of a line from a cursor inside it, or an arbitrary span of up
  to 35 tokens; holes on blank lines are skipped. Prefix and suffix share what the hole leaves,
  3:1 like the engine's context split.

Files are drawn in proportion to their tokens (every token equally likely). Cuts fall on token
boundaries of the whole file's encoding: at a line start that is how the engine encodes a prefix
and a suffix too; a cursor inside a line always sits on a token boundary here, which an editor's
cursor need not (the engine then encodes a partial word on its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.denoise.buckets import SPAN_GUESSES  # a hole is as long as one the engine tries
from engine.train.token_corpus import TokenCorpus

# How an infill row's hole length is drawn among the buckets that fit its middle. "uniform" pads
# holes with ~75% EOS on average, and a small model then learns "EOS" as the safe answer for every
# masked slot and floods holes with it; "small-first" favours the tightest bucket.
HOLE_POLICIES = {"uniform": (1.0, 1.0, 1.0, 1.0), "small-first": (0.55, 0.25, 0.12, 0.08)}
ATTEMPTS = 20  # hole draws per infill row before it falls back to a plain row
ARBITRARY_SPAN_TOKENS = 35  # ~120 characters


@dataclass
class Rows:
    ids: np.ndarray  # (n, L) int64
    protect: np.ndarray  # (n, L) bool: never masked (BOS, prefix, suffix, closing EOS, padding)


@dataclass(frozen=True)
class TokenTables:
    """Per-vocabulary facts the sampler needs about tokens."""

    blank: np.ndarray  # (V,) bool: whitespace only
    newline: np.ndarray  # (V,) bool: whitespace containing a line break

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenTables:
        n = tokenizer.vocab_size
        texts = [tokenizer.backend.decode([i], skip_special_tokens=False) for i in range(n)]
        special = tokenizer.special_ids
        blank = np.array([i not in special and bool(t) and not t.strip()
                          for i, t in enumerate(texts)])
        newline = blank & np.array(["\n" in t for t in texts])
        return cls(blank, newline)


class TokenRowSampler:
    def __init__(self, corpus: TokenCorpus, tables: TokenTables, *, bos_id: int, eos_id: int,
                 seq_len: int, fim_seq_len: int | None = None, hole_policy: str = "small-first",
                 keep: np.ndarray | None = None):
        """`keep` (F,) bool: files that may be sampled (default all)."""
        self.c = corpus
        self.tokens = corpus.tokens
        self.tables = tables
        self.bos, self.eos = bos_id, eos_id
        self.seq_len = seq_len
        self.fim_seq_len = fim_seq_len or seq_len
        self.hole_weights = np.array(HOLE_POLICIES[hole_policy])
        sizes = np.diff(corpus.file_starts).astype(np.float64)
        if keep is not None:
            sizes = sizes * keep
        if sizes.sum() <= 0:
            raise ValueError("the corpus has no tokens to sample")
        self.cum = np.cumsum(sizes) / sizes.sum()

    def batch(self, rng: np.random.Generator, n_plain: int, n_fim: int) -> tuple[Rows, Rows]:
        return self.plain_rows(rng, n_plain, self.seq_len), self.fim_rows(rng, n_fim)

    def _pick(self, u: np.ndarray) -> np.ndarray:
        # side="right": a file of weight 0 has the same cumulative value as the one before it.
        return np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1)

    # ------------------------------------------------------------------------- plain rows

    def plain_rows(self, rng: np.random.Generator, n: int, length: int) -> Rows:
        body = length - 2
        f = self._pick(rng.random(n))
        fe = self.c.file_starts[f + 1]
        la, lb = self.c.file_lines[f], self.c.file_lines[f + 1]
        # The last line start that still leaves a whole window inside the file (none: line 0).
        last = np.minimum(np.searchsorted(self.c.line_starts, fe - body, side="right") - 1, lb - 1)
        count = np.maximum(1, last - la + 1)
        line = la + (rng.random(n) * count).astype(np.int64)
        start = self.c.line_starts[line]
        idx = start[:, None] + np.arange(body)[None, :]
        inside = idx < fe[:, None]
        window = np.where(inside, self.tokens[np.minimum(idx, len(self.tokens) - 1)], self.eos)
        ids = np.empty((n, length), dtype=np.int64)
        ids[:, 0] = self.bos
        ids[:, 1:-1] = window
        ids[:, -1] = self.eos
        protect = np.ones((n, length), dtype=bool)
        protect[:, 1:-1] = ~inside
        return Rows(ids, protect)

    # ------------------------------------------------------------------------- infill rows

    def fim_rows(self, rng: np.random.Generator, n: int) -> Rows:
        length = self.fim_seq_len
        if n and length <= SPAN_GUESSES[-1] + 2:
            raise ValueError(f"infill rows need more than {SPAN_GUESSES[-1] + 2} tokens")
        ids = np.full((n, length), self.eos, dtype=np.int64)
        ids[:, 0] = self.bos
        protect = np.ones((n, length), dtype=bool)
        draws = rng.random((n, ATTEMPTS, 5))
        bucket_draws = rng.random(n)
        fallback = []
        for r in range(n):
            hole = self._hole(draws[r])
            if hole is None:
                fallback.append(r)
                continue
            lo, hi, fs, fe = hole
            self._fill(ids[r], protect[r], lo, hi, fs, fe, bucket_draws[r])
        if fallback:  # pathological corpus (tests): plain rows of the infill length
            plain = self.plain_rows(rng, len(fallback), length)
            ids[fallback], protect[fallback] = plain.ids, plain.protect
        return Rows(ids, protect)

    def _hole(self, draws: np.ndarray) -> tuple[int, int, int, int] | None:
        """Token range [lo, hi) of a middle of 1..64 tokens, and its file's [fs, fe)."""
        c, tokens, tables = self.c, self.tokens, self.tables
        files = self._pick(draws[:, 0])
        for (_, u_line, u_kind, u_a, u_b), f in zip(draws, files, strict=True):
            fs, fe = int(c.file_starts[f]), int(c.file_starts[f + 1])
            la, lb = int(c.file_lines[f]), int(c.file_lines[f + 1])
            if lb <= la:
                continue
            line = la + int(u_line * (lb - la))
            lo = int(c.line_starts[line])
            nxt = int(c.line_starts[line + 1]) if line + 1 < lb else fe
            if tables.blank[tokens[lo:nxt]].all():
                continue  # holes on blank lines teach nothing
            if u_kind < 0.5:  # one whole line, newline included (HumanEval single-line shape)
                hi = nxt
            elif u_kind < 0.75:  # a few whole lines
                last = min(lb - 1, line + 1 + int(u_a * 5))
                hi = int(c.line_starts[last + 1]) if last + 1 < lb else fe
            elif u_kind < 0.9:  # the rest of a line from a cursor inside it
                eol = nxt - 1 if tables.newline[tokens[nxt - 1]] else nxt
                cursor = lo + int(u_a * (eol - lo))
                if cursor >= eol:
                    continue
                lo, hi = cursor, eol
            else:  # an arbitrary span
                lo = fs + int(u_a * (fe - fs))
                hi = min(fe, lo + 1 + int(u_b * ARBITRARY_SPAN_TOKENS))
            if 0 < hi - lo <= SPAN_GUESSES[-1]:
                return lo, hi, fs, fe
        return None

    def _fill(self, ids: np.ndarray, protect: np.ndarray, lo: int, hi: int, fs: int, fe: int,
              u_bucket: float) -> None:
        """Write `[BOS] prefix middle EOS*pad suffix [EOS]` into a row pre-filled with EOS."""
        middle = hi - lo
        fitting = [i for i, b in enumerate(SPAN_GUESSES) if b >= middle]
        weights = self.hole_weights[fitting]
        pick = int(np.searchsorted(np.cumsum(weights) / weights.sum(), u_bucket, side="right"))
        hole = SPAN_GUESSES[fitting[min(pick, len(fitting) - 1)]]
        budget = len(ids) - 2 - hole
        # The engine's 3:1 prefix:suffix split; whatever one side leaves goes to the other.
        n_suffix = min(fe - hi, max(budget // 4, budget - (lo - fs)))
        n_prefix = min(lo - fs, budget - n_suffix)
        ids[1 : 1 + n_prefix + middle] = self.tokens[lo - n_prefix : hi]
        after = 1 + n_prefix + hole
        ids[after : after + n_suffix] = self.tokens[hi : hi + n_suffix]
        protect[1 + n_prefix : after] = False
