"""The one bucket table (engine/denoise/buckets.py): what each is for, held by its users."""

from __future__ import annotations

from engine.api import CompletionRequest
from engine.bench.shapes import small_random_args
from engine.denoise import buckets
from engine.denoise.buckets import LINE_SPAN_GUESSES, SPAN_GUESSES
from engine.denoise.kv_arena import common_layouts
from engine.engine import hole_lengths
from tests.fixtures.memorized import LONGEST_MIDDLE, TRAINED_HOLES


def test_every_table_rises():
    for name in ("SPAN_GUESSES", "LINE_SPAN_GUESSES", "BATCH_BUCKETS", "CONTEXT_BUCKETS",
                 "QUERY_BUCKETS", "REFRESH_BUCKETS"):
        table = getattr(buckets, name)
        assert all(0 < a < b for a, b in zip(table, table[1:], strict=False)), name


def test_a_hole_of_unknown_length_is_tried_at_the_span_guesses():
    free = CompletionRequest(prefix="a", suffix="b", max_tokens=64, stop="free")
    assert hole_lengths(free) == list(SPAN_GUESSES)
    line = CompletionRequest(prefix="a", suffix="b", max_tokens=64, stop="line")
    assert hole_lengths(line) == list(LINE_SPAN_GUESSES)


def test_the_test_model_learns_the_guesses_up_to_its_longest_middle():
    assert TRAINED_HOLES == tuple(n for n in SPAN_GUESSES if n <= LONGEST_MIDDLE)


def test_the_common_static_shapes_are_one_row_per_guess_at_each_context_bucket():
    args = small_random_args()
    shapes = {(layout.rows, layout.lmax) for layout in common_layouts(args)}
    assert shapes == {(len(LINE_SPAN_GUESSES), LINE_SPAN_GUESSES[-1]),
                      (len(SPAN_GUESSES), SPAN_GUESSES[-1])}
    for layout in common_layouts(args):
        assert layout.context in buckets.CONTEXT_BUCKETS
        assert layout.query - layout.shift in buckets.QUERY_BUCKETS
        assert layout.batch in buckets.BATCH_BUCKETS
