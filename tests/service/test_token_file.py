"""Where the HTTP token is, said plainly (issue 21.3): the engine's start-up line names the token
file, `maskfill-engine token` prints its path, and the README's curl works as written whether
XDG_RUNTIME_DIR is set or not (unset, the token lives in <tmp>/maskfill-<uid>, and the README's
old `$XDG_RUNTIME_DIR/maskfill/token` sent an empty token: 401)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import wait_http_ready

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ENGINE = VENV_BIN / "maskfill-engine"

pytestmark = [
    pytest.mark.skipif(not ENGINE.exists(), reason="the maskfill-engine script is not installed"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="the README's command needs curl"),
    pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell command"),
]


def readme_curl() -> str:
    """The README's first curl to the HTTP API, as a user would paste it."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(curl -s http://127\.0\.0\.1:8471/.*?)\n# e\.g\.", text, re.S)
    assert block, "the README's HTTP API example is missing"
    return block[1]


def user_env(tmp_path: Path, xdg: bool) -> dict[str, str]:
    """A login shell's environment: the venv's scripts on PATH, the runtime folder where it
    would be (XDG_RUNTIME_DIR, or the temp folder when that is unset), no test overrides."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASKFILL_RUNTIME_DIR", "XDG_RUNTIME_DIR")}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "/usr/bin:/bin")])
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    if xdg:
        env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
        (tmp_path / "run").mkdir(mode=0o700)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("xdg", [True, False], ids=["XDG_RUNTIME_DIR set", "unset"])
def test_the_readme_curl_works_as_written(tmp_path: Path, memorized_model: Path, xdg: bool):
    env = user_env(tmp_path, xdg)
    expected = (tmp_path / "run" / "maskfill" / "token" if xdg
                else tmp_path / "tmp" / f"maskfill-{os.getuid()}" / "token")
    missing = subprocess.run([str(ENGINE), "token"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1 and f"no token file at {expected} yet" in missing.stderr

    engine = subprocess.Popen(
        [str(ENGINE), "serve", "--model", str(memorized_model), "--no-socket",
         "--http", "127.0.0.1:0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = json.loads(engine.stdout.readline() or "{}")
        assert "http" in started, engine.stderr.read() if engine.poll() is not None else started
        # The start-up line names the token file; `maskfill-engine token` prints the same path.
        assert started["token_file"] == str(expected), started
        where = subprocess.run([str(ENGINE), "token"], env=env, capture_output=True, text=True,
                               timeout=120)
        assert where.returncode == 0, where.stderr
        assert where.stdout == f"{expected}\n"
        assert expected.read_text().strip() not in where.stdout + where.stderr  # never printed

        wait_http_ready(started["http"], seconds=300.0)  # the model loads after the endpoints line
        command = readme_curl().replace("http://127.0.0.1:8471", started["http"])
        curl = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], env=env,
                              capture_output=True, text=True, timeout=300)
        body, _, status = curl.stdout.rpartition("\n")
        assert status == "200", (command, curl.stdout, curl.stderr)
        answer = json.loads(body)
        assert answer["object"] == "text_completion" and len(answer["choices"]) == 1, answer
    finally:
        engine.terminate()
        engine.wait(30)
        engine.stdout.close()
        engine.stderr.close()
