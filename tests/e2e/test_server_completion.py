"""End to end over stdio: `python -m lsp_server --model <memorized checkpoint>` driven by
pytest-lsp as a Neovim-0.12 client (UTF-8 positions) and a VS Code-like client (UTF-16).

The model is real (tests/fixtures/memorized.py): every completion asserted here is the text
the tiny model memorized, reached through the whole server (snapshot, window, engine, post-
processing, ranges). One server per client kind serves all tests in this module.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

from lsp_server.request_timing import KEEP
from tests.e2e.server_session import (
    NEOVIM,
    VSCODE,
    inline,
    inline_params,
    open_document,
    replace,
    start,
    status,
    stop,
    wait_ready,
)
from tests.fixtures.memorized import SNIPPETS

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENCODINGS = {NEOVIM: "utf-8", VSCODE: "utf-16"}


def snippet(head: str) -> str:
    return next(s for s in SNIPPETS if s.startswith(head))


def apply(text: str, item: types.InlineCompletionItem, encoding: str) -> str:
    """Apply an inline item the way an editor does: replace its range (client units)."""
    lines = text.split("\n")

    def offset(position: types.Position) -> int:
        line = lines[position.line]
        units = 0
        for index, ch in enumerate(line):
            if units >= position.character:
                return sum(len(x) + 1 for x in lines[: position.line]) + index
            units += (
                len(ch.encode("utf-16-le")) // 2
                if encoding == "utf-16"
                else len(ch.encode("utf-8"))
            )
        return sum(len(x) + 1 for x in lines[: position.line]) + len(line)

    start, end = offset(item.range.start), offset(item.range.end)
    return text[:start] + item.insert_text + text[end:]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=[NEOVIM, VSCODE])
async def server(request, memorized_model):
    client, result = await start(memorized_model, request.param)
    ready = await wait_ready(client)
    assert ready["loadState"] == "ready", ready
    yield client, result, request.param
    await stop(client)


async def test_inline_completion_is_advertised_with_the_clients_encoding(server):
    _, result, name = server
    capabilities = result.capabilities
    assert capabilities.inline_completion_provider is not None
    assert capabilities.position_encoding == ENCODINGS[name]
    assert capabilities.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    assert {"maskfill.status", "maskfill.toggle"} <= set(
        capabilities.execute_command_provider.commands
    )
    assert {".", "("} <= set(capabilities.completion_provider.trigger_characters)


async def test_completes_a_memorized_function_body(server):
    client, _, name = server
    uri = f"file:///{name}/even.py"
    prefix = "def is_even(n):\n"
    open_document(client, uri, prefix)
    items = await inline(client, uri, 1, 0, invoked=True)  # manual: up to 3 distinct candidates
    assert 1 <= len(items) <= 3
    assert len({item.insert_text for item in items}) == len(items)
    assert all(item.range.start == types.Position(line=1, character=0) for item in items)
    applied = [apply(prefix, item, ENCODINGS[name]) for item in items]
    assert snippet(prefix).rstrip("\n") in applied, "the memorized body is among the candidates"


async def test_multibyte_characters_before_the_cursor_give_a_correct_range(server):
    client, _, name = server
    multibyte = [s for s in SNIPPETS if not s.split("\n", 1)[0].isascii()]
    if not multibyte:
        pytest.skip("needs a SNIPPETS entry with é/emoji on its first line (tests/fixtures)")
    text = multibyte[0]
    first_line = text.split("\n", 1)[0]
    encoding = ENCODINGS[name]
    column = units(first_line, encoding)
    assert column != len(first_line)  # the client units really differ from code points
    uri = f"file:///{name}/multibyte.py"
    open_document(client, uri, first_line)
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"stopMode": "block"})
    )
    items = await inline(client, uri, 0, column, invoked=False)
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"stopMode": "auto"})
    )
    assert items
    cursor = types.Position(line=0, character=column)
    assert items[0].range.start == cursor and items[0].range.end == cursor
    assert apply(first_line, items[0], encoding) == text.rstrip("\n")


def units(text: str, encoding: str) -> int:
    return len(text.encode("utf-16-le")) // 2 if encoding == "utf-16" else len(text.encode())


async def test_multibyte_word_under_a_popup_selection_gets_a_correct_range(server):
    """`ré😀` typed, the completion popup selects `return` for that word: the server must
    find the word's offsets through the client's units and answer over the same range."""
    client, _, name = server
    encoding = ENCODINGS[name]
    uri = f"file:///{name}/selection.py"
    text = "def is_even(n):\n    ré😀"
    open_document(client, uri, text)
    word_start = types.Position(line=1, character=4)
    cursor = types.Position(line=1, character=4 + units("ré😀", encoding))
    params = inline_params(uri, 1, cursor.character, invoked=False)
    params.context.selected_completion_info = types.SelectedCompletionInfo(
        range=types.Range(start=word_start, end=cursor), text="return"
    )
    result = await client.text_document_inline_completion_async(params)
    assert result.items
    item = result.items[0]
    assert item.range == types.Range(start=word_start, end=cursor)
    assert item.insert_text.startswith("return")  # extends the selected item's text
    assert apply(text, item, encoding) == snippet("def is_even(n):\n").rstrip("\n")


async def test_post_processing_on_the_models_own_output(server):
    """Real model output through two rules: a mid-line cursor gets one line with the part
    that repeats the rest of the line trimmed; an indented body follows the file's tabs."""
    client, _, name = server
    encoding = ENCODINGS[name]
    mid_line = f"file:///{name}/mid_line.py"
    text = "def is_even(n):\n    return n % 0\n"
    open_document(client, mid_line, text)
    items = await inline(client, mid_line, 1, len("    return n % "), invoked=False)
    assert items and "\n" not in items[0].insert_text
    assert apply(text, items[0], encoding) == snippet("def is_even(n):\n")

    tabs = f"file:///{name}/tabs.py"
    # Tab-indented code the model does not see (no lines after the cursor in its window)
    # still decides how its body is indented.
    text = "def is_even(n):\n\n\n\nclass Box:\n\tdef get(self):\n\t\treturn self.value\n"
    open_document(client, tabs, text)
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"contextLinesAfter": 0})
    )
    try:
        items = await inline(client, tabs, 1, 0, invoked=False)
    finally:
        client.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"contextLinesAfter": 60})
        )
    memorized_body = snippet("def is_even(n):\n").split("\n")[1]  # indented with spaces
    assert items and items[0].insert_text == "\t" + memorized_body.lstrip(" ")


async def test_crlf_file_gets_crlf_completion(server):
    client, _, name = server
    uri = f"file:///{name}/total.py"
    prefix = "def total(items):\r\n"
    open_document(client, uri, prefix)
    items = await inline(client, uri, 1, 0, invoked=False)
    assert items
    expected = snippet("def total(items):\n").rstrip("\n").replace("\n", "\r\n")
    assert prefix + items[0].insert_text == expected


async def test_cache_and_typed_through_answer_without_the_model(server):
    client, _, name = server
    uri = f"file:///{name}/typed.py"
    prefix = "def is_even(n):\n"
    open_document(client, uri, prefix)
    first = await inline(client, uri, 1, 0, invoked=False)
    assert first and first[0].insert_text == snippet(prefix).split("\n")[1]
    before = await status(client)
    assert await inline(client, uri, 1, 0, invoked=False) == first  # exact-context cache
    cached = await status(client)
    assert cached["cacheHits"] == before["cacheHits"] + 1
    assert cached["modelRuns"] == before["modelRuns"]
    replace(client, uri, 2, (1, 0), (1, 0), "    ret")
    items = await inline(client, uri, 1, 7, invoked=False)
    after = await status(client)
    assert items[0].insert_text == first[0].insert_text[len("    ret") :]
    assert items[0].range.start == types.Position(line=1, character=7)
    assert after["modelRuns"] == before["modelRuns"]
    assert after["typedThroughHits"] == before["typedThroughHits"] + 1


async def test_burst_of_50_edits_answers_only_the_last_state(server):
    client, _, name = server
    uri = f"file:///{name}/burst.py"
    prefix = "def add(a, b):\n"
    open_document(client, uri, prefix + "x" * 50)
    # A debounce longer than the burst takes to send: every request but the last is
    # superseded while it waits, whatever the machine's load.
    slow = {"debounceMinMs": 2000, "debounceMaxMs": 2000}
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=slow))
    before = await status(client)
    futures = []
    for i in range(50):  # delete one character at a time, asking after each (like Neovim)
        length = 49 - i
        replace(client, uri, 2 + i, (1, length), (1, length + 1), "")
        params = inline_params(uri, 1, length, invoked=False)
        futures.append(
            asyncio.wrap_future(
                client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, params)
            )
        )
    answers = [await f for f in futures]
    after = await status(client)
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"debounceMinMs": 75, "debounceMaxMs": 400})
    )

    last = answers[-1].items
    assert last and apply(prefix, last[0], ENCODINGS[name]) == snippet(prefix).rstrip("\n")
    for answer in answers[:-1]:  # every superseded request answers nothing
        assert answer is None or not answer.items
    runs = after["modelRuns"] - before["modelRuns"]
    assert runs == 1, runs


async def test_cancel_request_stops_the_job_and_the_server_keeps_serving(server):
    client, _, name = server
    busy, target = f"file:///{name}/busy.py", f"file:///{name}/cancel.py"
    open_document(client, busy, "def greet(name):\n")
    open_document(client, target, "def clamp(x, lo, hi):\n")
    before = await status(client)
    # Back to back, as an editor does: the target queues behind (or starts right after) the
    # busy document's run, and its $/cancelRequest arrives while it waits or denoises.
    blocker = client.protocol.send_request(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(busy, 1, 0)
    )
    cancelled = client.protocol.send_request(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(target, 1, 0), msg_id=f"c-{name}"
    )
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=f"c-{name}"))
    with pytest.raises(JsonRpcRequestCancelled):
        await asyncio.wrap_future(cancelled)
    await asyncio.wrap_future(blocker)

    def stopped(s):
        return s["cancelledRuns"] + s["droppedJobs"]

    for _ in range(600):  # a running job stops at its next denoising step
        if stopped(await status(client)) > stopped(before):
            break
        await asyncio.sleep(0.05)
    assert stopped(await status(client)) == stopped(before) + 1
    assert await inline(client, target, 1, 0, invoked=False)  # still serving, same document


async def test_bad_input_gets_empty_answers_and_the_server_keeps_serving(server):
    client, _, name = server
    uri = f"file:///{name}/bad.py"
    open_document(client, uri, "def is_even(n):\n")
    assert await inline(client, uri, 7, 0) == []  # line past the end
    assert await inline(client, uri, 0, 400) == []  # column past the end of the line
    assert await inline(client, f"file:///{name}/never-opened.py", 0, 0) == []
    binary = f"file:///{name}/blob.bin"
    open_document(client, binary, "\x00\x01\x02ELF\x00" * 200)
    assert await inline(client, binary, 0, 10) == []
    huge = f"file:///{name}/huge.py"
    open_document(client, huge, ("x = 1\n" * 900_000))  # ~5.4 MB
    before = await status(client)
    assert await inline(client, huge, 450_000, 0, invoked=True) == []  # over maxDocumentBytes
    assert (await status(client))["modelRuns"] == before["modelRuns"]
    assert await inline(client, uri, 1, 0)  # and the normal document still completes


async def test_only_lsp_line_breaks_split_lines_in_edits_and_positions(server):
    """U+2028 and a form feed are not line breaks in LSP (str.splitlines thinks they are): an
    edit on line 1 lands after them, and positions on that line are valid to its real end."""
    client, _, name = server
    uri = f"file:///{name}/odd_breaks.py"
    open_document(client, uri, "s = 'a\u2028b\x0c'\n")
    replace(client, uri, 2, (1, 0), (1, 0), "t = s")  # LSP line 1: the empty last line
    before = await status(client)
    assert await inline(client, uri, 1, 6) == []  # past the end of "t = s": refused at once
    assert (await status(client))["requests"] == before["requests"]
    await inline(client, uri, 1, 5)  # the end of "t = s": a valid position, served
    assert (await status(client))["requests"] == before["requests"] + 1


async def test_the_status_times_each_completion_request_around_the_engine(server):
    """Issue 23's server overhead, as the server measures it: from the request read to its
    response written, the engine's part (engine.complete) and the rest; CPU times beside."""
    client, _, name = server
    uri = f"file:///{name}/timed.py"
    open_document(client, uri, "def is_even(n):\n")
    before = await status(client)
    await inline(client, uri, 1, 0, invoked=False)
    ran = await status(client)
    assert ran["modelRuns"] == before["modelRuns"] + 1
    timed = ran["recentRequests"][-1]
    assert timed["method"] == "textDocument/inlineCompletion"
    assert timed["engineMs"] > 0 and timed["wallMs"] >= timed["engineMs"]
    assert abs(timed["overheadMs"] - (timed["wallMs"] - timed["engineMs"])) < 0.01
    assert timed["loopCpuMs"] >= 0 and timed["offloadedCpuMs"] > 0  # the hole check ran
    await inline(client, uri, 1, 0, invoked=False)  # the exact-context cache answers
    cached = (await status(client))["recentRequests"][-1]
    assert cached["engineMs"] is None and cached["overheadMs"] == cached["wallMs"]
    assert len(ran["recentRequests"]) == min(len(before["recentRequests"]) + 1, KEEP)
