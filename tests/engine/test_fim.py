"""Infill layouts per family, the window cut, end-token trimming and stop modes."""

from __future__ import annotations

import pytest
import torch

from engine.denoise.fim import (
    build_infill_batch,
    context_budget,
    cut_context,
    precut_text,
    trim_at_end,
)
from engine.model.config import ModelArgs
from engine.stop import apply_stop, stop_after_accepting, stop_for_cursor

MASK, EOS, BOS = 90, 91, 92


def _args(variant: str, max_context: int = 64) -> ModelArgs:
    family = "llada" if variant == "llada" else "dream"
    return ModelArgs(
        family=family, variant=variant, vocab_size=100, dim=8, n_layers=1, n_heads=2,
        n_kv_heads=1, head_dim=4, ffn_dim=16, norm_eps=1e-6, rope_theta=1e4,
        qkv_bias=family == "dream", tie_embeddings=False, logit_shift=family == "dream",
        max_context=max_context, infill_bos=variant != "open-dcoder",
        infill_eos=variant in ("dream", "dreamon"), mask_token_id=MASK, eos_token_id=EOS,
        pad_token_id=EOS, bos_token_id=None if variant == "open-dcoder" else BOS,
    )


def test_dream_layout_batches_several_hole_lengths_with_aligned_holes():
    batch = build_infill_batch(_args("dream"), [1, 2, 3], [7, 8], [2, 4])
    assert batch.ids.tolist() == [
        [BOS, 1, 2, 3, MASK, MASK, 7, 8, EOS, EOS, EOS],  # right-padded (pad id)
        [BOS, 1, 2, 3, MASK, MASK, MASK, MASK, 7, 8, EOS],
    ]
    assert batch.key_valid.tolist() == [[True] * 9 + [False] * 2, [True] * 11]
    assert batch.positions.tolist() == [list(range(11))] * 2
    assert batch.hole_start == 4
    assert batch.hole_valid.tolist() == [[True, True, False, False], [True] * 4]
    assert batch.hole().tolist() == [[MASK, MASK, 7, 8], [MASK] * 4]


def test_open_dcoder_layout_has_no_specials_and_an_anchor_for_an_empty_prefix():
    args = _args("open-dcoder")
    batch = build_infill_batch(args, [1, 2], [3], [2])
    assert batch.ids.tolist() == [[1, 2, MASK, MASK, 3]]
    # Shifted logits: hole slot 0 is predicted from the token before it, which must exist.
    empty = build_infill_batch(args, [], [], [3])
    assert empty.ids.tolist() == [[EOS, MASK, MASK, MASK]]
    assert empty.hole_start == 1


def test_llada_layout_keeps_bos_and_has_no_trailing_eos():
    batch = build_infill_batch(_args("llada"), [], [5], [2])
    assert batch.ids.tolist() == [[BOS, MASK, MASK, 5]]
    assert batch.hole_start == 1


def test_context_budget_counts_specials_and_the_longest_hole():
    assert context_budget(_args("dream", 64), 16, None) == 64 - 2 - 16
    assert context_budget(_args("dream", 64), 16, 40) == 40 - 2 - 16
    assert context_budget(_args("open-dcoder", 64), 16, None) == 64 - 1 - 16  # shift anchor
    assert context_budget(_args("llada", 64), 16, None) == 64 - 1 - 16


def test_cut_keeps_short_contexts_whole():
    assert cut_context([1, 2], [3], 10) == ([1, 2], [3])
    assert cut_context([], [], 0) == ([], [])


def test_cut_drops_the_left_of_the_prefix_and_the_right_of_the_suffix():
    prefix, suffix = list(range(100)), list(range(100, 200))
    p, s = cut_context(prefix, suffix, 40)
    assert p == prefix[-30:] and s == suffix[:10]  # about 3:1
    p, s = cut_context(prefix, [7, 8], 40)  # short suffix kept whole, prefix takes the rest
    assert p == prefix[-38:] and s == [7, 8]
    p, s = cut_context([1, 2, 3], suffix, 40)  # short prefix kept whole
    assert p == [1, 2, 3] and s == suffix[:37]
    assert cut_context(prefix, suffix, 0) == ([], [])


def test_precut_bounds_the_text_handed_to_the_tokenizer():
    prefix, suffix = "a" * 10_000, "b" * 10_000
    p, s = precut_text(prefix, suffix, 10)
    assert p == prefix[-320:] and s == suffix[:320]
    assert precut_text("x", "y", 10) == ("x", "y")


def test_trim_at_first_end_token_or_remaining_mask():
    assert trim_at_end([4, 5, EOS, 6], {EOS}, MASK) == ([4, 5], True)
    assert trim_at_end([4, 5, 6], {EOS}, MASK) == ([4, 5, 6], False)
    assert trim_at_end([4, MASK, EOS], {EOS}, MASK) == ([4], False)
    assert trim_at_end([EOS], {EOS}, MASK) == ([], True)


def test_line_stop_keeps_the_first_line():
    assert apply_stop("x + 1)\n    y = 2\n", "line", "    print(") == "x + 1)"
    assert apply_stop("abc", "line", "") == "abc"
    # At the end of a line the completion starts with a newline: offer the next line, not "".
    assert apply_stop("\n    return x\n    y = 1\n", "line", "def f(x):") == "\n    return x"


def test_free_stop_keeps_everything():
    text = "a\nb\n\nc"
    assert apply_stop(text, "free", "") == text


def test_block_stop_ends_where_a_line_dedents_out_of_the_cursor_block():
    prefix = "def f(x):\n    y = "
    text = "x + 1\n    z = y * 2\n    return z\n\ndef g():\n    pass\n"
    assert apply_stop(text, "block", prefix) == "x + 1\n    z = y * 2\n    return z"


def test_block_stop_after_a_colon_takes_the_new_body_only():
    prefix = "for i in range(3):"
    text = "\n    print(i)\n    total += i\nprint(total)\n"
    assert apply_stop(text, "block", prefix) == "\n    print(i)\n    total += i"
    braces = "if (x) {"
    body = "\n  y++;\n}\nz();"
    assert apply_stop(body, "block", braces) == "\n  y++;"


def test_block_stop_on_a_blank_cursor_line_uses_the_first_written_line():
    prefix = "class A:\n    def f(self):\n        "
    text = "return 1\n\n    def g(self):\n        return 2\n"
    assert apply_stop(text, "block", prefix) == "return 1"


def test_block_stop_keeps_a_completion_that_never_dedents():
    prefix = "def f():\n    "
    text = "a = 1\n    b = 2\n"
    assert apply_stop(text, "block", prefix) == text


def test_expr_stop_ends_where_the_enclosing_bracket_closes():
    # the closer of a bracket opened before the cursor is kept (the server trims a duplicate)
    assert apply_stop("a, b)\n    return x", "expr", "    f(") == "a, b)"
    # brackets opened in the completion are matched, not taken for the enclosing one
    assert apply_stop("g(a), [1, 2])\nz", "expr", "f(") == "g(a), [1, 2])"
    # no closer: the end of the line at depth 0
    assert apply_stop("x > 0:  \n    y", "expr", "if ") == "x > 0:"
    # a closer or line break inside a string does not end it
    assert apply_stop("')', 1) + 2", "expr", "f(") == "')', 1)"


def test_expr_stop_asks_for_short_holes():
    from engine.api import CompletionRequest
    from engine.engine import hole_lengths

    request = CompletionRequest(prefix="f(", suffix=")", max_tokens=64, stop="expr")
    assert hole_lengths(request) == [8, 16]


def test_unknown_stop_mode_is_refused():
    with pytest.raises(ValueError):
        apply_stop("x", "sentence", "")


def test_hole_valid_is_a_bool_tensor_on_the_requested_device():
    batch = build_infill_batch(_args("dream"), [1], [2], [3], device="cpu")
    assert batch.hole_valid.dtype == torch.bool and batch.ids.device.type == "cpu"


def test_auto_stop_mode_follows_the_cursor():
    assert stop_for_cursor("    x = foo(", "bar)") == "line"  # text after the cursor
    assert stop_for_cursor("def f(x):", "") == "block"  # a line that opens a block
    assert stop_for_cursor("    ", "") == "block"  # an empty line
    assert stop_for_cursor("    y = 2", "") == "line"  # end of a written line: the next line


def test_the_stop_after_accepting_is_the_automatic_one_at_the_new_cursor_unless_set():
    """The engine speculates beside the next request's hole (engine/denoise/speculation.py),
    whose length follows that request's stop mode."""
    # Automatic (the rule gives `block` here): a block that ends on a written line -> `line`.
    assert stop_after_accepting("block", "def f(x):", "\n", "\n    return x") == "line"
    # ... and a line that opens a block -> `block`.
    assert stop_after_accepting("line", "    y = 2", "\n", "\n    if y:") == "block"
    assert stop_after_accepting("line", "    x = foo(", "bar)\n", "a, ") == "line"
    # Not what the rule gives here: the user's setting, asked for again.
    assert stop_after_accepting("block", "    y = 2", "\n", "\n    z = 3") == "block"
    assert stop_after_accepting("expr", "f(", ")\n", "x") == "expr"
    assert stop_after_accepting("free", "def f(x):", "\n", "\n    return x") == "free"


def _embedded_encode():
    from engine.model.embedded_model import EMBEDDED_DIR
    from engine.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(EMBEDDED_DIR).encode


@pytest.mark.parametrize("budget", [0, 7, 64, 320, 960])
@pytest.mark.parametrize("where", [0.0, 0.05, 0.5, 0.97, 1.0])
def test_tokenizing_near_the_hole_keeps_what_the_whole_text_would(budget, where):
    """The engine tokenizes only pieces next to the hole; the rows must be what tokenizing the
    whole file and cutting gives (blank-line runs and long lines at the cuts included)."""
    from pathlib import Path

    from engine.denoise.fim import context_near_hole

    encode = _embedded_encode()
    source = Path(__file__).resolve().parents[2] / "engine" / "engine.py"
    text = source.read_text() + "\n\n\n\n    x = '" + "y" * 3000 + "'\n\n" + source.read_text()
    at = int(len(text) * where)
    prefix, suffix = text[:at], text[at:]
    assert context_near_hole(encode, prefix, suffix, budget) == cut_context(
        encode(prefix), encode(suffix), budget)
