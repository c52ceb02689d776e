"""The server's one config surface: a typed struct read from initializationOptions and
workspace/didChangeConfiguration (camelCase keys on the wire).

A bad or unknown field never stops the server: it is named in a warning and its default is used,
while the other fields keep the values the user gave.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from engine.api import QuantMode

StopSetting = Literal["auto", "line", "block", "free"]
EngineMode = Literal["auto", "inprocess", "shared", "remote"]
Device = Annotated[str, msgspec.Meta(pattern=r"^(cpu|cuda(:\d+)?|mps)$")]

SETTINGS_SECTION = "maskfill"  # clients may nest our settings under this key
TRANSPORT_TOKEN_KEY = "token"
NAMED_UNKNOWN = 10  # unknown keys named in the warning; the rest are counted


class Settings(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """Every option the server reads; the README lists them with these defaults."""

    enabled: bool = True  # maskfill.toggle flips this at runtime
    model: str | None = None  # checkpoint folder or HF cache repo id; None: the embedded model
    device: Device = "cpu"
    fallback_device: Device | None = "cpu"  # tried when loading or running on `device` fails
    quant: QuantMode = "none"
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=512)] = 32  # span budget, in tokens
    timeout_ms: Annotated[float, msgspec.Meta(gt=0)] = 3000.0  # engine deadline per request
    debounce_min_ms: Annotated[float, msgspec.Meta(ge=0, le=5000)] = 75.0
    debounce_max_ms: Annotated[float, msgspec.Meta(ge=0, le=5000)] = 400.0
    context_lines_before: Annotated[int, msgspec.Meta(ge=0)] = 200
    context_lines_after: Annotated[int, msgspec.Meta(ge=0)] = 60
    context_tokens: Annotated[int, msgspec.Meta(ge=16)] = 1024  # split ~3:1 prefix:suffix
    stop_mode: StopSetting = "auto"  # auto: mid-line cursor -> one line, else a block
    num_candidates: Annotated[int, msgspec.Meta(ge=1, le=8)] = 3  # for manual (Invoked) triggers
    languages: list[str] = msgspec.field(default_factory=list)  # languageIds served; []: all
    cache_size: Annotated[int, msgspec.Meta(ge=0)] = 256  # exact-context LRU entries
    # Larger documents get an empty answer at once: no scan of a huge file on the request path.
    max_document_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1_000_000
    # auto: one shared engine process on a GPU, the model in this process on CPU (README).
    engine_mode: EngineMode = "auto"
    # remote: http(s) URL; shared: unix:/path, tcp://h:p, or tls://h:p (an engine with --tls-cert)
    engine_endpoint: str | None = None
    engine_token_file: str | None = None  # token for TCP/HTTP; must be private to the user
    # PEM CA file that tls:// and https:// engines' certificates are checked against (a
    # self-signed engine's own certificate); None: the system's CAs.
    engine_ca_file: str | None = None
    engine_idle_exit_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    # Reuse the last contexts' K/V across keystrokes (in-process engine; README, engine section).
    context_reuse: bool = True
    # Syntax-aware stops, cuts and ranking where a tree-sitter grammar exists (issue 23): the
    # cursor's kind picks the stop, every row is cut until the file parses, and only rows that
    # parse are shown. False: today's rules everywhere.
    syntax: bool = True
    # Tokens of other files' code (open-file windows, imported definitions, recent edits) sent
    # before the file (issue 23). None: a quarter of contextTokens within what the model's
    # window leaves, 0 under a 1024-token window (the embedded model); 0: none.
    extra_context_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def serves(self, language_id: str | None) -> bool:
        return not self.languages or (language_id or "") in self.languages


# msgspec names the failing field as "... - at `$.someField`" (or `$.field[0]` for lists).
_FIELD_IN_ERROR = re.compile(r"at `\$\.([A-Za-z0-9_]+)")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]+)`")


def _unwrap(raw: Any) -> Any:
    """Accept both `{...options}` and `{"maskfill": {...options}}` (VS Code's section shape)."""
    if isinstance(raw, dict) and isinstance(raw.get(SETTINGS_SECTION), dict):
        return raw[SETTINGS_SECTION]
    return raw


def parse_settings(raw: Any, base: Settings | None = None) -> tuple[Settings, list[str]]:
    """Build Settings from a JSON-like value; returns (settings, one warning per bad field).

    Fields missing from `raw` keep their value from `base` (the current settings), so a
    didChangeConfiguration that sends one key changes only that key.
    """
    base = base or Settings()
    raw = _unwrap(raw)
    if raw is None:
        return base, []
    if not isinstance(raw, dict):
        return base, [f"maskfill settings must be an object, got {type(raw).__name__}; ignored"]

    known = {field.encode_name for field in msgspec.structs.fields(Settings)}
    # `token` is the TCP transport's credential (lsp_server/transport.py), not a setting.
    unknown = [key for key in raw if key not in known and key != TRANSPORT_TOKEN_KEY]
    warnings = [_unknown_warning(unknown)] if unknown else []
    defaults = msgspec.to_builtins(Settings())
    merged = msgspec.to_builtins(base)
    for key, value in raw.items():
        if key not in known:
            continue
        if _has_lone_surrogate(value):  # msgspec cannot even read it (no UTF-8 form)
            warnings.append(f"maskfill setting `{key}` is not valid text; using the default")
            merged[key] = defaults[key]
        else:
            merged[key] = value
    for _ in range(len(merged) + 1):  # each pass removes one bad field
        try:
            return msgspec.convert(merged, Settings), warnings
        except msgspec.ValidationError as exc:
            message = str(exc)
            field = _bad_field(message)
            if field is None or field not in merged:
                return base, [*warnings, f"maskfill settings ignored: {message}"]
            bad_value = merged.pop(field)
            if field in defaults:
                merged[field] = defaults[field]
                warnings.append(
                    f"maskfill setting `{field}` = {bad_value!r} is invalid ({message}); "
                    f"using the default {defaults[field]!r}"
                )
            else:
                warnings.append(f"maskfill setting `{field}` is unknown; ignored")
    return base, warnings


def _has_lone_surrogate(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        return not value.isascii() and any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, list) and depth < 8:
        return any(_has_lone_surrogate(item, depth + 1) for item in value)
    if isinstance(value, dict) and depth < 8:
        return any(_has_lone_surrogate(k, depth + 1) or _has_lone_surrogate(v, depth + 1)
                   for k, v in value.items())
    return False


def _unknown_warning(keys: list[str]) -> str:
    """One line for any number of unknown keys (a client may send thousands)."""
    named = ", ".join(f"`{key}`" for key in keys[:NAMED_UNKNOWN])
    if len(keys) == 1:
        return f"maskfill setting {named} is unknown; ignored"
    more = f" and {len(keys) - NAMED_UNKNOWN} more" if len(keys) > NAMED_UNKNOWN else ""
    return f"maskfill: {len(keys)} unknown settings ignored: {named}{more}"


def _bad_field(message: str) -> str | None:
    if match := _UNKNOWN_FIELD.search(message):
        return match.group(1)
    if match := _FIELD_IN_ERROR.search(message):
        return match.group(1)
    return None
