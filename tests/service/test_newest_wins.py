"""The one newest-wins rule (engine/serve/newest_wins.py) that the LSP server, the in-process
worker and the shared engine all use."""

from engine.serve.newest_wins import NewestWins


def test_a_newer_entry_supersedes_every_older_one_for_its_key_only():
    superseded: list[str] = []
    newest: NewestWins[str] = NewestWins(superseded.append)
    newest.begin("a", "a1")
    newest.begin("b", "b1")
    newest.begin("a", "a2")
    assert superseded == ["a1"] and newest.superseded == 1
    assert newest.is_latest("a", "a2") and not newest.is_latest("a", "a1")
    assert newest.is_latest("b", "b1")
    newest.end("a", "a1")  # an older one ending changes nothing
    assert newest.is_latest("a", "a2")
    newest.end("a", "a2")
    assert not newest.is_latest("a", "a2") and newest.live("a") == []
    newest.begin("a", "a3")  # nothing left to supersede
    assert superseded == ["a1"]


def test_a_supersede_callback_may_end_the_entry_it_is_given():
    newest: NewestWins[str] = NewestWins(lambda old: newest.end("k", old))
    newest.begin("k", "old")
    newest.begin("k", "new")
    assert newest.live("k") == ["new"]
