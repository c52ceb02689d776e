"""The LSP4IJ user-defined server template in editors/jetbrains: well-formed files, the fields
LSP4IJ reads (LanguageServerTemplate / its deserializer), a command that is our console script,
and settings the server accepts."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import msgspec
import pytest

from lsp_server.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "editors" / "jetbrains"
TEMPLATE_FILES = [
    "template.json",
    "settings.json",
    "settings.schema.json",
    "initializationOptions.json",
    "clientSettings.json",
]
OS_KEYS = {"default", "windows", "mac", "unix"}  # what LanguageServerTemplate looks up
MAIN_LANGUAGES = {"python", "java", "kotlin", "javascript", "typescript", "go", "rust", "c", "cpp"}


def load(name: str):
    return json.loads((TEMPLATE / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", TEMPLATE_FILES)
def test_every_file_is_a_json_object(name: str) -> None:
    assert isinstance(load(name), dict)


def test_readme_is_there_for_the_import_dialog() -> None:
    readme = (TEMPLATE / "README.md").read_text(encoding="utf-8")
    assert "maskfill-lsp" in readme


def test_template_has_the_fields_lsp4ij_reads() -> None:
    template = load("template.json")
    assert isinstance(template["id"], str) and template["id"]
    assert isinstance(template["name"], str) and template["name"]
    assert set(template["programArgs"]) <= OS_KEYS
    assert isinstance(template["programArgs"]["default"], str)
    mappings = template["fileTypeMappings"]
    for mapping in mappings:
        assert isinstance(mapping["languageId"], str) and mapping["languageId"]
        patterns = mapping["fileType"]["patterns"]
        assert patterns and all(isinstance(p, str) and p.startswith("*.") for p in patterns)
    assert MAIN_LANGUAGES <= {m["languageId"] for m in mappings}
    all_patterns = [p for m in mappings for p in m["fileType"]["patterns"]]
    assert len(all_patterns) == len(set(all_patterns)), "a file pattern is mapped twice"


def test_command_is_the_installed_console_script() -> None:
    scripts = {
        ep.name: ep.value
        for ep in distribution("maskfill").entry_points
        if ep.group == "console_scripts"
    }
    for os_key, command in load("template.json")["programArgs"].items():
        argv = shlex.split(command)
        assert argv[0] in scripts, f"{os_key}: {argv[0]!r} is not a console script of maskfill"
        assert scripts[argv[0]] == "lsp_server.__main__:main"
        assert argv[1:] == ["--stdio"]
    # The launcher exists where `pip install` put it (the venv running these tests) and runs.
    launcher = Path(sys.executable).parent / "maskfill-lsp"
    proc = subprocess.run(
        [str(launcher), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0 and "--stdio" in proc.stdout, proc.stderr


def test_command_line_is_accepted_by_the_server() -> None:
    from lsp_server.__main__ import parse_args

    argv = shlex.split(load("template.json")["programArgs"]["default"])
    assert parse_args(argv[1:]).stdio is True


def test_initialization_options_parse_without_warnings() -> None:
    raw = load("initializationOptions.json")
    settings, warnings = parse_settings(raw)
    assert warnings == []
    for key, value in raw.items():
        assert msgspec.to_builtins(settings)[key] == value


def test_settings_json_parses_without_warnings() -> None:
    assert parse_settings(load("settings.json"))[1] == []


def test_schema_describes_exactly_the_server_settings() -> None:
    schema = load("settings.schema.json")
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    defaults = msgspec.to_builtins(Settings())
    assert set(schema["properties"]) == set(defaults)
    for key, spec in schema["properties"].items():
        assert spec["default"] == defaults[key], key
        assert spec["description"], key
