"""The VS Code extension as `make test` sees it: its vitest suite, tsc, the .vsix, and the
manifest's agreement with the server's settings.

The TypeScript tests run offline against a mocked `vscode` module (editors/vscode/test/). They need
node and npm; `npm ci` runs only when node_modules is missing or older than package-lock.json. When
that `npm ci` cannot reach the registry (no network), they are skipped, naming npm's error; any
other failure fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import msgspec
import pytest

from lsp_server.settings import Settings

EXTENSION = Path(__file__).resolve().parents[2] / "editors" / "vscode"
CLIENT_ONLY_KEYS = {"serverPath", "trigger"}  # read by the extension, never sent to the server
NPM_TIMEOUT_S = 600

needs_node = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not on PATH; the VS Code extension's TypeScript tests need them",
)


def manifest() -> dict:
    return json.loads((EXTENSION / "package.json").read_text(encoding="utf-8"))


def run(*cmd: str, timeout: float = NPM_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        cwd=EXTENSION,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# npm's error codes for a registry it cannot reach (DNS, refused, reset, timed out, no route).
NETWORK_ERROR_CODES = frozenset(
    {
        "ENOTFOUND",
        "EAI_AGAIN",
        "ECONNREFUSED",
        "ECONNRESET",
        "ETIMEDOUT",
        "ESOCKETTIMEDOUT",
        "ERR_SOCKET_TIMEOUT",
        "ENETUNREACH",
        "EHOSTUNREACH",
    }
)
NPM_ERROR_CODE = re.compile(r"^npm (?:error|ERR!) code (\S+)", re.MULTILINE)
NPM_FETCH_ERROR = re.compile(r"^npm (?:error|ERR!) (?:FetchError|network) .*$", re.MULTILINE)


def npm_network_failure(output: str) -> str | None:
    """npm's own words when `output` (a failed npm's stdout + stderr) says it could not reach
    the registry; None for every other failure (bad lock file, a package's build, ...)."""
    code = NPM_ERROR_CODE.search(output)
    if code is None or code.group(1) not in NETWORK_ERROR_CODES:
        return None
    detail = NPM_FETCH_ERROR.search(output)
    return detail.group(0) if detail else code.group(0)


def npm_ci(cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def node_modules() -> Path:
    installed = EXTENSION / "node_modules" / ".package-lock.json"  # npm writes it on install
    lock = EXTENSION / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        proc = npm_ci(EXTENSION)
        if proc.returncode != 0:
            offline = npm_network_failure(proc.stdout + proc.stderr)
            if offline:
                pytest.skip(f"npm ci could not reach the npm registry: {offline}")
            pytest.fail(f"npm ci failed:\n{proc.stdout}\n{proc.stderr}")
    return installed.parent


@needs_node
def test_npm_network_failure_is_told_from_other_npm_failures(tmp_path: Path) -> None:
    """Real npm runs: an unreachable registry (and an empty cache, so nothing is served from it)
    is a network failure; a missing lock file is not."""
    unreachable = tmp_path / "unreachable"
    unreachable.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(EXTENSION / name, unreachable / name)
    proc = npm_ci(
        unreachable,
        "--ignore-scripts",
        "--registry=http://127.0.0.1:9/",  # the discard port: connection refused
        f"--cache={tmp_path / 'empty-cache'}",
        "--fetch-retries=0",
    )
    assert proc.returncode != 0
    reason = npm_network_failure(proc.stdout + proc.stderr)
    assert reason is not None and "ECONNREFUSED" in reason, proc.stderr

    no_lock = tmp_path / "no-lock"
    no_lock.mkdir()
    shutil.copy(EXTENSION / "package.json", no_lock / "package.json")
    proc = npm_ci(no_lock, "--ignore-scripts", f"--cache={tmp_path / 'empty-cache'}")
    assert proc.returncode != 0
    assert npm_network_failure(proc.stdout + proc.stderr) is None, proc.stderr


@needs_node
def test_vitest_suite_passes(node_modules: Path) -> None:
    proc = run("npx", "vitest", "run", "--reporter=verbose")
    # A suite that found no tests also exits 0 under some configs: insist the files ran.
    for name in ("extension", "installCheck", "middleware", "serverPath", "settings", "status"):
        assert f"test/{name}.test.ts" in proc.stdout, proc.stdout


@needs_node
def test_typescript_typechecks(node_modules: Path) -> None:
    run("npx", "tsc", "--noEmit")


@needs_node
def test_packages_to_a_vsix_with_only_the_bundle(node_modules: Path, tmp_path: Path) -> None:
    vsix = tmp_path / "maskfill.vsix"
    run(
        "npx",
        "vsce",
        "package",
        "--no-dependencies",
        "--allow-missing-repository",
        "--skip-license",
        "--out",
        str(vsix),
    )
    names = set(zipfile.ZipFile(vsix).namelist())
    assert {"extension/package.json", "extension/out/extension.js"} <= names
    assert not any(n.startswith(("extension/node_modules/", "extension/src/")) for n in names)
    bundle = zipfile.ZipFile(vsix).read("extension/out/extension.js").decode()
    assert 'require("vscode")' in bundle  # vscode stays external; the language client is inlined


def test_manifest_pins_what_vsce_and_inline_completion_need() -> None:
    pkg = manifest()
    engine = pkg["engines"]["vscode"].lstrip("^~")
    types = pkg["devDependencies"]["@types/vscode"]
    # vsce refuses an @types/vscode newer than engines.vscode.
    assert tuple(map(int, types.split("."))) <= tuple(map(int, engine.split(".")))
    client = tuple(map(int, pkg["dependencies"]["vscode-languageclient"].split(".")))
    assert client >= (10, 0, 1)  # inline completion built in from 10.0.1
    for spec in [*pkg["dependencies"].values(), *pkg["devDependencies"].values()]:
        assert spec[0].isdigit(), f"unpinned npm dependency {spec!r}"
    assert pkg["scripts"]["package"].startswith("vsce package --no-dependencies")
    assert "--external:vscode" in pkg["scripts"]["build"]


def test_contributed_settings_match_the_server() -> None:
    properties = manifest()["contributes"]["configuration"]["properties"]
    contributed = {key.removeprefix("maskfill."): spec for key, spec in properties.items()}
    server_defaults = msgspec.to_builtins(Settings())  # camelCase keys, as on the wire
    assert set(contributed) - CLIENT_ONLY_KEYS == set(server_defaults)
    for key, default in server_defaults.items():
        assert contributed[key]["default"] == default, key


def test_settings_sent_by_the_extension_parse_without_warnings() -> None:
    """What the extension sends when the user changed nothing is a valid server configuration."""
    from lsp_server.settings import parse_settings

    properties = manifest()["contributes"]["configuration"]["properties"]
    sent = {
        key.removeprefix("maskfill."): spec["default"]
        for key, spec in properties.items()
        if key.removeprefix("maskfill.") not in CLIENT_ONLY_KEYS
    }
    settings, warnings = parse_settings(sent)
    assert warnings == []
    assert settings == Settings()


def test_server_path_is_read_where_users_put_it_and_not_synced() -> None:
    """A machine-overridable setting is dropped from User settings in a remote window (code-server,
    SSH): window scope reads it there (Remote settings still take precedence). A path belongs to
    one machine, so Settings Sync leaves it alone."""
    spec = manifest()["contributes"]["configuration"]["properties"]["maskfill.serverPath"]
    assert spec["scope"] == "window"
    assert spec["ignoreSync"] is True
