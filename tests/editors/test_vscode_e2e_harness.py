"""The parts of the real-VS Code harness (tests/editors/vscode_e2e) that run without a browser, in
`make test`: process trees ended by PID, the stdio tap's timing records, the bench's matching of
a keystroke to the request that answered it, and the toolchain's account of what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.editors.vscode_e2e import lsp_tap, processes
from tests.editors.vscode_e2e.bench import Served, served
from tests.editors.vscode_e2e.toolchain import missing_parts


def test_descendants_are_found_and_ended_by_pid() -> None:
    # A shell whose child sleeps: two levels below us, like code-server -> exthost -> server.
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        tree = []
        for _ in range(100):
            tree = processes.descendants(parent.pid)
            if tree:
                break
            subprocess.run(["sleep", "0.05"])
        assert [p.argv[0] for p in tree] == ["sleep"], tree
        assert tree[0].ppid == parent.pid
        processes.end([parent.pid, *(p.pid for p in tree)], grace=5)
        assert processes.wait_gone([p.pid for p in tree], 5) == []
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(timeout=10)
    assert not processes.alive(parent.pid)


def frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return f"Content-Length: {len(body)}\r\n\r\n".encode() + body


# A stand-in server: answers an inline completion request with one item, then exits at EOF.
ECHO_SERVER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from tests.editors.vscode_e2e.lsp_tap import read_message
    while (got := read_message(sys.stdin.buffer)) is not None:
        request = json.loads(got[1])
        if "id" not in request:
            continue
        body = json.dumps({"jsonrpc": "2.0", "id": request["id"],
                           "result": {"items": [{"insertText": "x"}]}}).encode()
        sys.stdout.buffer.write(b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)
        sys.stdout.buffer.flush()
    """
)


def test_the_tap_passes_bytes_unchanged_and_times_inline_requests(tmp_path: Path) -> None:
    server = tmp_path / "server.py"
    server.write_text(ECHO_SERVER, encoding="utf-8")
    log = tmp_path / "tap.jsonl"
    root = str(Path(__file__).resolve().parents[2])
    request = {"jsonrpc": "2.0", "id": 7, "method": lsp_tap.INLINE, "params": {}}
    note = {"jsonrpc": "2.0", "method": "textDocument/didChange", "params": {}}
    proc = subprocess.run(
        [sys.executable, lsp_tap.__file__, str(log), "--", sys.executable, str(server), root],
        input=frame(note) + frame(request),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    reply = {"jsonrpc": "2.0", "id": 7, "result": {"items": [{"insertText": "x"}]}}
    assert proc.stdout == frame(reply)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["dir"], r["id"], r["method"]) for r in records] == [
        ("in", 7, lsp_tap.INLINE),
        ("out", 7, lsp_tap.INLINE),
    ]
    assert records[1]["items"] == 1
    assert records[0]["t"] <= records[1]["t"]


def test_a_keystroke_is_matched_to_the_last_answer_with_items_before_the_ghost() -> None:
    records = [
        {"dir": "in", "id": 1, "method": lsp_tap.INLINE, "t": 900.0},  # before the key press
        {"dir": "out", "id": 1, "items": 1, "t": 950.0},
        {"dir": "in", "id": 2, "method": lsp_tap.INLINE, "t": 1010.0},
        {"dir": "in", "id": 2, "method": "cancel", "t": 1050.0},
        {"dir": "out", "id": 2, "items": 0, "t": 1100.0},  # cancelled, empty: not what was shown
        {"dir": "in", "id": 3, "method": lsp_tap.INLINE, "selection": True, "t": 1120.0},
        {"dir": "out", "id": 3, "items": 1, "t": 1300.0},
        {"dir": "in", "id": 4, "method": lsp_tap.INLINE, "t": 1350.0},
        {"dir": "out", "id": 4, "items": 1, "t": 1500.0},  # after the ghost appeared
    ]
    assert served(records, key_at=1000.0, ghost_at=1320.0) == Served(180.0, 3, 1, True)
    assert served(records, key_at=1000.0, ghost_at=None) == Served(None, 3, 1, False)


def test_missing_parts_say_how_to_get_them(tmp_path: Path) -> None:
    missing = missing_parts(tmp_path / "empty-cache")
    assert any(m.startswith("node 24") for m in missing), missing
    assert any(m.startswith("code-server 4.139") for m in missing), missing
