"""Frames and the private runtime folder: what crosses the socket, and who may open it."""

from __future__ import annotations

import os
import stat

import pytest

from engine.api import CompletionRequest, EngineError
from engine.serve import paths
from engine.serve.protocol import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    Complete,
    FrameError,
    Result,
    decode_client,
    decode_server,
    encode,
    frame_length,
)


def test_messages_round_trip_through_frames():
    message = Complete(id=7, key="file:///a.py",
                       request=CompletionRequest(prefix="def f():\n", suffix="", stop="line"))
    frame = encode(message)
    assert frame_length(frame[:HEADER_BYTES]) == len(frame) - HEADER_BYTES
    assert decode_client(frame[HEADER_BYTES:]) == message
    reply = encode(Result(id=7, error="bad completion request: x"))
    assert decode_server(reply[HEADER_BYTES:]) == Result(id=7, error="bad completion request: x")


def test_bad_frames_are_refused_with_a_reason():
    with pytest.raises(FrameError, match="over the"):
        frame_length((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="bad message"):
        decode_client(b"\x81\xa4type\xa4nope")
    with pytest.raises(FrameError, match="bad message"):  # a server message sent to the server
        decode_client(encode(Result(id=1))[HEADER_BYTES:])


def test_the_runtime_folder_is_private(tmp_path, monkeypatch):
    folder = tmp_path / "rt"
    monkeypatch.setenv(paths.RUNTIME_DIR_ENV, str(folder))
    assert paths.runtime_dir() == folder
    paths.private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)  # opened by hand: the user's choice, used as it is (issue 20.7)
    paths.private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    folder.chmod(0o775)  # others could swap the socket: refused, and still not changed
    with pytest.raises(EngineError, match="writable by others"):
        paths.private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775
    folder.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(EngineError, match="not a folder"):
        paths.private_dir(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a folder to another user")
def test_a_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(EngineError, match="another user"):
        paths.private_dir(folder)


def test_tokens_are_created_private_and_open_ones_refused(tmp_path):
    token_file = tmp_path / "sub" / "token"
    token = paths.ensure_token(token_file)
    assert len(token) >= 32 and paths.ensure_token(token_file) == token  # stable once made
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token_file.chmod(0o640)
    with pytest.raises(EngineError, match="readable by others.*chmod 600"):
        paths.read_token(token_file)
    token_file.chmod(0o600)
    token_file.write_text("\n")
    with pytest.raises(EngineError, match="empty"):
        paths.read_token(token_file)
    with pytest.raises(EngineError, match="cannot read"):
        paths.read_token(tmp_path / "missing")


def test_one_engine_per_model_device_and_quant(tmp_path):
    keys = {paths.engine_key(str(tmp_path), d, q) for d in ("cpu", "cuda") for q in
            ("none", "int8")}
    assert len(keys) == 4
    # the same folder named two ways is the same engine
    assert paths.engine_key(str(tmp_path), "cpu", "none") == paths.engine_key(
        str(tmp_path / "." / ""), "cpu", "none")
    lock = paths.EngineLock(tmp_path / "e.lock")
    other = paths.EngineLock(tmp_path / "e.lock")
    assert lock.acquire() and not other.acquire()
    lock.release()
    assert other.acquire()
    other.release()
