"""Each post-processing rule on its own, then the pipeline order."""

import pytest

from engine.stop import apply_stop
from lsp_server.postprocess import (
    CursorContext,
    choose_stop,
    cut_at_stop,
    is_useless,
    match_indentation,
    postprocess,
    trim_duplicate_suffix,
    trim_repetition,
)


def ctx(before: str, after: str = "", **kwargs) -> CursorContext:
    return CursorContext(line_before=before, line_after=after, **kwargs)


# -- stop rule: mid-line -> single line; empty line / after an opener -> block ----------------


def test_auto_stop_mid_line_is_single_line():
    assert choose_stop(ctx("x = foo(", ")"), "auto") == "line"
    assert choose_stop(ctx("total = "), "auto") == "line"


def test_auto_stop_on_empty_line_or_after_opener_is_block():
    assert choose_stop(ctx("    "), "auto") == "block"
    assert choose_stop(ctx("def f(x):"), "auto") == "block"
    assert choose_stop(ctx("if (x) {"), "auto") == "block"


def test_explicit_stop_setting_wins():
    assert choose_stop(ctx("x = foo(", ")"), "block") == "block"


def test_line_mode_keeps_the_first_line_only():
    assert cut_at_stop("a + b\nprint(x)\n", ctx("return "), "line") == "a + b"


def test_block_mode_on_empty_line_stops_when_the_scope_ends():
    text = "x = 1\n    y = 2\nz = 3\ndef other():"
    # cursor at depth 4 on an empty line: "z = 3" (depth 0) leaves the block
    assert cut_at_stop(text, ctx("    "), "block") == "x = 1\n    y = 2"


def test_block_mode_after_opener_keeps_the_body_only():
    text = "\n    if x:\n        return 1\n    return 2\ndef g():\n    pass"
    assert cut_at_stop(text, ctx("def f(x):"), "block") == (
        "\n    if x:\n        return 1\n    return 2"
    )


def test_line_mode_at_a_line_end_offers_the_next_line():
    # The engine's rule: the completion starts with the line break, the next line is the one
    # worth offering (the server's own copy cut it to "", and showed nothing).
    assert cut_at_stop("\n    y = 2\n    z = 3", ctx("    x = 1"), "line") == "\n    y = 2"


def test_block_mode_after_a_bracket_ends_at_the_line_back_at_its_depth():
    text = "\n    a,\n    b,\n)\nprint(x)"
    assert cut_at_stop(text, ctx("x = f("), "block") == "\n    a,\n    b,"


def test_block_mode_at_column_0_of_a_blank_line_follows_the_first_written_line():
    text = "    y = 2\n    z = 3\nw = 4"
    assert cut_at_stop(text, ctx(""), "block") == "    y = 2\n    z = 3"


# One stop rule (issue 22): the engine cuts with engine/stop.py, the server cuts again with the
# same function. (prefix, line_after, mode, model text): the cases of both sides' tests, and the
# ones where the server's former copy differed (a blank first line in line mode, a block after
# `(`/`[`, a blank cursor line at column 0).
STOP_CASES = [
    ("    print(", ")", "line", "x + 1)\n    y = 2\n"),
    ("return ", "", "line", "a + b\nprint(x)\n"),
    ("def f(x):", "", "line", "\n    return x\n    y = 1\n"),
    ("    y = 2", "", "line", "\n    z = 3  \n    w = 4"),
    ("", "", "free", "a\nb\n\nc\n"),
    ("def f(x):\n    y = ", "", "block", "x + 1\n    z = y * 2\n    return z\n\ndef g():\n"),
    ("for i in range(3):", "", "block", "\n    print(i)\n    total += i\nprint(total)\n"),
    ("if (x) {", "", "block", "\n  y++;\n}\nz();"),
    ("class A:\n    def f(self):\n        ", "", "block", "return 1\n\n    def g(self):\n"),
    ("def f():\n    ", "", "block", "a = 1\n    b = 2\n"),
    ("    ", "", "block", "x = 1\n    y = 2\nz = 3\ndef other():"),
    ("x = f(", "", "block", "\n    a,\n    b,\n)\nprint(x)"),
    ("items = [", "", "block", "\n    1,\n    2,\n]\nnext()"),
    ("", "", "block", "    y = 2\n    z = 3\nw = 4"),
    ("    f(", ")", "expr", "a, b)\n    return x"),
    ("f(", ")", "expr", "g(a), [1, 2])\nz"),
    ("if ", "", "expr", "x > 0:  \n    y"),
    ("f(", ")", "expr", "')', 1) + 2"),
]


@pytest.mark.parametrize(("prefix", "after", "mode", "text"), STOP_CASES)
def test_the_server_cuts_where_the_engine_cuts(prefix, after, mode, text):
    engine_cut = apply_stop(text, mode, prefix)  # what Engine.complete returns
    context = ctx(prefix.rsplit("\n", 1)[-1], after)
    server_cut = cut_at_stop(text, context, mode)
    # the same place, the server only dropping trailing whitespace before an empty rest of line
    assert server_cut == (engine_cut.rstrip() if mode == "block" or not after else engine_cut)
    # and the server's second cut of the engine's answer changes nothing
    assert cut_at_stop(engine_cut, context, mode) == server_cut


# -- trim what duplicates the text after the cursor ------------------------------------------


def test_trims_duplicated_closing_brackets_and_quotes():
    assert trim_duplicate_suffix("a, b)", ctx("foo(", ")")) == "a, b"
    assert trim_duplicate_suffix("hello')", ctx("print('", "')")) == "hello"


def test_trims_a_rewritten_rest_of_line():
    assert trim_duplicate_suffix("2 == 0", ctx("return n % ", "0")) == "2 == "
    assert trim_duplicate_suffix("a + b * c", ctx("return ", "b * c")) == "a + "


def test_does_not_trim_a_coincidental_identifier_overlap():
    assert trim_duplicate_suffix("foo", ctx("x = ", "o + 1")) == "foo"


def test_cuts_where_the_completion_runs_into_the_next_lines():
    context = ctx("    ", "", next_lines=["", "    return result"])
    text = "result += 1\n    return result\n"
    assert trim_duplicate_suffix(text, context) == "result += 1"


# -- indentation: the file's tabs or spaces ---------------------------------------------------


def test_spaces_become_tabs_in_a_tab_indented_file():
    text = "if x:\n    y = 1\n        z = 2"
    assert match_indentation(text, "\t") == "if x:\n\ty = 1\n\t\tz = 2"


def test_tabs_become_the_files_spaces():
    assert match_indentation("if x:\n\ty = 1", "  ") == "if x:\n  y = 1"


def test_first_line_is_reindented_only_when_the_cursor_line_is_blank():
    assert match_indentation("    return 1", "\t", at_line_start=True) == "\treturn 1"
    assert match_indentation("    return 1", "\t", at_line_start=False) == "    return 1"


def test_matching_indentation_is_left_alone():
    text = "if x:\n    y = 1"
    assert match_indentation(text, "    ") == text


# -- drop what is not worth showing ------------------------------------------------------------


def test_empty_and_whitespace_only_are_dropped():
    assert is_useless("", ctx("x = "))
    assert is_useless("  \n\t\n", ctx("x = "))


def test_repeated_lines_are_dropped():
    assert is_useless("x += 1\nx += 1\nx += 1", ctx("    "))


def test_a_copy_of_the_line_above_is_dropped():
    assert is_useless("x = compute(a)", ctx("    ", previous_line="    x = compute(a)"))
    assert not is_useless("y = compute(a)", ctx("    ", previous_line="    x = compute(a)"))


# -- the pipeline ---------------------------------------------------------------------------------


def test_pipeline_applies_the_files_crlf_line_endings():
    context = ctx("def f(x):", "", indent_unit="    ", eol="\r\n")
    assert postprocess("\n    return x\n", context, "block") == "\r\n    return x"


def test_pipeline_returns_none_when_nothing_is_left():
    context = ctx("foo(", ")")
    assert postprocess(")", context, "line") is None


def test_a_line_repeated_three_times_in_a_row_is_cut_to_one_copy():
    assert trim_repetition("total = 0\nx += 1\nx += 1\n    x += 1\nreturn x") == "total = 0\nx += 1"
    assert trim_repetition("a\nb\nb\nc") == "a\nb\nb\nc"  # twice is not a loop
    assert trim_repetition("a\n\n\n\nb") == "a\n\n\n\nb"  # blank lines are not a loop


def test_a_copy_of_the_lines_just_above_is_dropped():
    above = ["def f():", "    x = compute(a)", "    y = compute(b)"]
    context = ctx("    ", previous_line=above[-1], previous_lines=above)
    assert is_useless("x = compute(a)\n    y = compute(b)", context)
    assert is_useless("y = compute(b)", context)
    assert not is_useless("z = compute(c)", context)
    assert not is_useless("x = compute(a)\n    z = 1", context)  # new code after the copy


def test_pipeline_trims_a_looping_block():
    context = ctx("    ", indent_unit="    ")
    text = "items.append(1)\n    log(x)\n    log(x)\n    log(x)\n    log(x)"
    assert postprocess(text, context, "block") == "items.append(1)\n    log(x)"
