"""HoleCheck and ranking: what counts as parsing, what the cut keeps, what ranks first."""

from __future__ import annotations

from lsp_server.syntax import HoleCheck, Row, cut_rows, rank


def test_an_error_elsewhere_in_the_file_is_tolerated():
    before = "def broken(:\n    pass\n\ndef f(a):\n    return "
    after = "\n"
    check = HoleCheck("python", before, after)
    assert check.has_opinion
    assert check.truncate("a + 1").parses is True
    assert check.truncate("a +").text == "a"  # cut at the last token boundary that parses
    assert check.truncate(")").parses is False


def test_no_grammar_means_no_opinion():
    check = HoleCheck("cobol", "MOVE ", " TO X.")
    assert not check.has_opinion
    cut = check.truncate("A")
    assert (cut.text, cut.parses) == ("A", None)


def test_an_empty_or_blank_cut_is_never_accepted():
    check = HoleCheck("python", "x = [", "]\n")
    assert check.truncate("   \n  ").parses is False


def test_rank_orders_ended_then_parses_then_non_empty_then_confidence():
    rows = [
        Row("a", ended=False, confidence=0.99, parses=True),
        Row("b", ended=True, confidence=0.5, parses=False),
        Row("c", ended=True, confidence=0.4, parses=True),
        Row("d", ended=True, confidence=0.9, parses=True),
        Row("  ", ended=True, confidence=1.0, parses=True),
    ]
    ranked, dropped = rank(rows)
    assert [row.text for row in ranked] == ["d", "c", "b", "a"]
    assert dropped == 1


def test_cut_rows_cuts_once_per_text_and_a_cut_counts_as_ended():
    check = HoleCheck("python", "def f(a):\n    return ", "\n")
    rows = [
        Row("a + 1\n    print(", ended=False, confidence=0.6),
        Row("a + 1\n    print(", ended=False, confidence=0.6),
        Row(")", ended=True, confidence=0.9),
    ]
    ranked = cut_rows(check, rows)
    assert ranked.rows[0] == Row("a + 1", ended=True, confidence=0.6, parses=True,
                                 lines_dropped=1)
    assert ranked.rows[-1].parses is False and ranked.rows[-1].text == ")"
    first_checks = ranked.checks
    assert first_checks == check.checks and first_checks < 2 * 3 + 24  # duplicates not re-cut


def test_every_humaneval_single_line_reference_is_kept_as_it_is():
    """The cut must never lower HumanEval single-line pass@1: each reference line, in its
    hole, is accepted unchanged (a handful of holes get no opinion, which changes nothing)."""
    from engine.eval.harness import load_tasks

    tasks, _ = load_tasks("humaneval-single")
    no_opinion = 0
    for task in tasks:
        cut = HoleCheck("python", task.prompt, task.suffix).truncate(task.canonical)
        if cut.parses is None:
            no_opinion += 1
        assert cut.text == task.canonical, task.task_id
        assert cut.parses is not False, task.task_id
    assert no_opinion < len(tasks) // 50
