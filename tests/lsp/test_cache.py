"""Exact-context LRU and typed-through reuse."""

from engine.serve.exact_cache import ExactCache
from lsp_server.cache import TypedThrough, inserted_at


def test_lru_hit_miss_and_eviction():
    cache = ExactCache(capacity=2)
    cache.put(("p1", "s"), ("a",))
    cache.put(("p2", "s"), ("b",))
    assert cache.get(("p1", "s")) == ("a",)  # p1 is now the most recent
    cache.put(("p3", "s"), ("c",))
    assert cache.get(("p2", "s")) is None  # the least recent went
    assert cache.get(("p1", "s")) == ("a",) and cache.get(("p3", "s")) == ("c",)
    assert (cache.hits, cache.misses) == (3, 1)


def test_zero_capacity_caches_nothing():
    cache = ExactCache(capacity=0)
    cache.put("k", ("a",))
    assert cache.get("k") is None and len(cache) == 0


def test_typed_through_answers_the_rest_of_the_suggestion():
    typed = TypedThrough()
    before = "def add(a, b):\n    return "
    after = "\n\nprint(add(1, 2))\n"
    typed.remember("u", before + after, len(before), ("a + b", "b + a"))
    now = before + "a +" + after
    assert typed.reuse("u", now, len(before) + 3) == (" b",)
    assert typed.hits == 1


def test_typed_through_needs_matching_typed_text_and_unchanged_surroundings():
    typed = TypedThrough()
    before, after = "x = ", "\ny = 2\n"
    typed.remember("u", before + after, len(before), ("foo(1)",))
    assert typed.reuse("u", before + "bar" + after, len(before) + 3) is None  # diverged
    assert typed.reuse("u", before + "fo" + "\ny = 3\n", len(before) + 2) is None  # suffix changed
    assert typed.reuse("u", "z" + before + "fo" + after, len(before) + 3) is None  # earlier edit
    assert typed.reuse("u", before + after, len(before)) is None  # nothing typed: not this rule
    assert typed.reuse("u", before + "foo(1)" + after, len(before) + 6) is None  # all typed
    assert typed.reuse("other", before + "fo" + after, len(before) + 2) is None


def test_typed_through_forgets_on_empty_answer():
    typed = TypedThrough()
    typed.remember("u", "ab", 1, ("x",))
    typed.remember("u", "ab", 1, ())
    assert typed.reuse("u", "axb", 2) is None


def test_inserted_at_finds_only_a_pure_insertion_at_the_cursor():
    before = "def f():\n    \nx = 1\n"
    cursor = before.index("    \n") + 4
    after = before[:cursor] + "ret" + before[cursor:]
    assert inserted_at(before, after, cursor) == "ret"
    assert inserted_at(before, before, cursor) is None  # nothing typed
    assert inserted_at(before, "# " + after, cursor) is None  # an edit elsewhere
    assert inserted_at(after, before, cursor) is None  # deletion
