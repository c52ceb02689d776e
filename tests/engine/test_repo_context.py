"""Extra context in the request (issue 23 part B.2): laid out with the tokenizer's repository
token when it has one (looked up by name), else as comment blocks; whole chunks within half
the context budget; the default (no extra) prompt unchanged; a pre-warm encodes the
context ahead of the request so it starts warm."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.api import CompletionRequest, ContextChunk
from engine.denoise.repo_context import FILE_SEP_TOKEN, comment_block, extra_ids, file_sep_id
from engine.engine import Engine

CHUNKS = (ContextChunk("pkg/util.py", "def helper(x):\n    return x * 2"),
          ContextChunk("web/app.js", "export function go() {}"))


@pytest.fixture(scope="module")
def engine(memorized_model):
    torch.set_num_threads(1)
    loaded = Engine.load(str(memorized_model))
    yield loaded
    loaded.close()


def test_without_a_repository_token_chunks_are_comment_blocks(engine):
    tok = engine.tokenizer
    assert file_sep_id(tok) is None  # the memorized model's tokenizer has none
    ids = extra_ids(tok, CHUNKS, 10_000)
    assert tok.decode(ids) == (
        "# Compare this snippet from pkg/util.py:\n# def helper(x):\n#     return x * 2\n"
        "// Compare this snippet from web/app.js:\n// export function go() {}\n")
    assert comment_block(CHUNKS[1]).startswith("// ")


def test_with_the_repository_token_its_id_comes_from_the_tokenizer(engine):
    tok = copy.deepcopy(engine.tokenizer)
    tok.backend.add_special_tokens([FILE_SEP_TOKEN])
    sep = tok.backend.token_to_id(FILE_SEP_TOKEN)
    assert file_sep_id(tok) == sep
    ids = extra_ids(tok, CHUNKS, 10_000)
    assert ids[0] == sep and ids[-1] == sep and ids.count(sep) == 3
    assert tok.backend.decode(ids[1:ids.index(sep, 1)]) == "pkg/util.py\n" + CHUNKS[0].text + "\n"


def test_chunks_that_do_not_fit_are_dropped_whole_from_the_end(engine):
    tok = engine.tokenizer
    first = len(extra_ids(tok, CHUNKS[:1], 10_000))
    assert extra_ids(tok, CHUNKS, first) == extra_ids(tok, CHUNKS[:1], 10_000)
    assert extra_ids(tok, CHUNKS, first - 1) == []
    assert extra_ids(tok, (), 10_000) == []


def test_the_extra_block_goes_before_the_prefix_within_the_window(engine):
    base = dict(prefix="def add(a, b):\n", suffix="\n", max_tokens=8, stop="line")
    plain = engine.complete(CompletionRequest(**base))
    again = engine.complete(CompletionRequest(**base, extra=()))
    assert again.stats.prefix_tokens == plain.stats.prefix_tokens  # the default is unchanged
    carried = engine.complete(CompletionRequest(**base, extra=CHUNKS))
    added = len(extra_ids(engine.tokenizer, CHUNKS, 10_000))
    assert carried.stats.prefix_tokens == plain.stats.prefix_tokens + added
    # A window too small for it (the block may take half): the file keeps its tokens.
    tight = dict(base, max_context_tokens=plain.stats.prefix_tokens + 8 + 4)
    squeezed = engine.complete(CompletionRequest(**tight, extra=CHUNKS))
    assert squeezed.stats.prefix_tokens == plain.stats.prefix_tokens


def test_a_prewarmed_context_makes_the_next_request_warm(memorized_model):
    warm = Engine.load(str(memorized_model))
    try:
        request = CompletionRequest(prefix="def greet(name):\n", suffix="\n", max_tokens=8,
                                    stop="line", extra=CHUNKS)
        assert warm.prewarm(request)
        assert warm.wait_idle(60)
        assert warm.prewarms == 1
        result = warm.complete(request)
        assert result.stats.reused_context_tokens > 0
        assert warm.prewarm(request) and warm.wait_idle(60)
        assert warm.prewarms == 1  # already in the cache: not encoded again
    finally:
        warm.close()
    cold = Engine.load(str(memorized_model), context_reuse=False)
    try:
        assert not cold.prewarm(request)
    finally:
        cold.close()
