"""The settings the editors' READMEs list are the settings the server reads (issue 21.6: the Neovim
and JetBrains READMEs had lost the five engine/reuse settings), and the Node version the README
gives for `make vsix` is one the extension's locked build tools accept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from lsp_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVER_SETTINGS = {field.encode_name for field in msgspec.structs.fields(Settings)}


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([A-Za-z]+)`", text))


def between(text: str, start: str, end: str) -> str:
    assert start in text, start
    tail = text[text.index(start) + len(start):]
    assert end in tail, end
    return tail[: tail.index(end)]


def test_the_schema_is_the_server_settings():
    schema = json.loads((ROOT / "editors/jetbrains/settings.schema.json").read_text())
    assert set(schema["properties"]) == SERVER_SETTINGS


@pytest.mark.parametrize("readme, start, end", [
    ("editors/neovim/README.md", "All server settings (", ") are described"),
    ("editors/jetbrains/README.md", "validates the settings editor against it): ",
     " (each explained"),
])
def test_an_editor_readme_lists_every_server_setting(readme, start, end):
    listed = backticked(between((ROOT / readme).read_text(), start, end))
    assert listed == SERVER_SETTINGS, (
        f"missing: {sorted(SERVER_SETTINGS - listed)}, unknown: {sorted(listed - SERVER_SETTINGS)}")


def test_the_top_level_settings_table_has_every_server_setting():
    text = (ROOT / "README.md").read_text()
    table = between(text, "| setting | default | meaning |", "\n\n")
    names = set()
    for row in table.splitlines()[2:]:
        names |= backticked(row.split("|")[1])
    assert names == SERVER_SETTINGS, (
        f"missing: {sorted(SERVER_SETTINGS - names)}, unknown: {sorted(names - SERVER_SETTINGS)}")


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def satisfies(have: tuple[int, ...], ranges: str) -> bool:
    """npm `engines` ranges as package-lock.json records them: `||` of space-separated
    comparators (`>=`, `>`, `<=`, `<`, `^`, bare) and `*` (the forms our lockfile holds)."""
    def holds(op: str, wanted: tuple[int, ...]) -> bool:
        padded = wanted + (0,) * (3 - len(wanted))
        if op == "^":
            return have >= padded and have[0] == padded[0]
        if not op:  # "20": any 20.x.y; "20.19": any 20.19.y
            return have[: len(wanted)] == wanted
        return {">=": have >= padded, ">": have > padded, "<=": have <= padded,
                "<": have < padded}[op]

    for alternative in ranges.split("||"):
        alternative = alternative.strip()
        if alternative in ("*", ""):
            return True
        comparators = re.findall(r"(>=|<=|>|<|\^|)\s*v?(\d+(?:\.\d+){0,2})", alternative)
        assert comparators and re.sub(r"(>=|<=|>|<|\^|)\s*v?\d+(\.\d+){0,2}|\s", "",
                                      alternative) == "", f"unsupported range {alternative!r}"
        if all(holds(op, version(wanted)) for op, wanted in comparators):
            return True
    return False


def test_the_node_version_for_make_vsix_is_one_the_build_tools_accept():
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"`make vsix` builds .*?\(needs Node\.js (\d+\.\d+) or newer, "
                       r"(\d+\.\d+)\+ on the (\d+) line", " ".join(readme.split()))
    assert stated, "the README must say which Node.js `make vsix` needs"
    oldest = version(stated[1]) + (0,)
    next_line = version(stated[2]) + (0,)
    lock = json.loads((ROOT / "editors/vscode/package-lock.json").read_text())
    refused = {name: p["engines"]["node"] for name, p in lock["packages"].items()
               if isinstance(p.get("engines"), dict) and "node" in p["engines"]
               and not (satisfies(oldest, p["engines"]["node"])
                        and satisfies(next_line, p["engines"]["node"]))}
    assert not refused, refused
    # ... and the stated minimums are the real ones: a minor release older is refused.
    engines = [p["engines"]["node"] for p in lock["packages"].values()
               if isinstance(p.get("engines"), dict) and "node" in p["engines"]]
    for stated_minimum in (oldest, next_line):
        older = (stated_minimum[0], stated_minimum[1] - 1, 0)
        assert any(not satisfies(older, ranges) for ranges in engines), older
