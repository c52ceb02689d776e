"""Definitions of the names a Python file imports and uses near the cursor, as signature
lines (CrossCodeEval's cross-file context; Continue's "import definitions").

Line-based on purpose: the file being edited is often half-typed (no `ast`), and a scan of the
imported module's top-level lines costs about a millisecond where a parse costs several.
Modules resolve inside the workspace folders only (workspace_files.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lsp_server.context.workspace_files import WorkspaceFiles

NEAR_LINES = 20  # names used this close to the cursor are looked up
MAX_CLASS_LINES = 24
MAX_HEADER_LINES = 8
MAX_REEXPORT_DEPTH = 2
SOURCE_FOLDERS = ("", "src", "lib")  # where an absolute import's top package may live

_IMPORT = re.compile(r"^\s*import\s+(.+)$")
_FROM = re.compile(r"^\s*from\s+(\.*)([\w.]*)\s+import\s+(.+)$")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_DOTTED = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_TOP_DEF = re.compile(r"^(?:async\s+def|def|class)\s+([A-Za-z_]\w*)")
_TOP_ASSIGN = re.compile(r"^([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)")
_MEMBER = re.compile(r"^(?:async\s+def|def)\s+\w+|^[A-Za-z_]\w*\s*(?::|=(?!=))")


@dataclass(frozen=True)
class Imported:
    module: str  # dotted, with its leading dots when relative
    name: str | None  # `from module import name`; None for `import module`


@dataclass(frozen=True)
class Definition:
    path: Path
    name: str
    text: str
    start_line: int  # 1-based
    end_line: int


def parse_imports(lines: list[str]) -> dict[str, Imported]:
    """Local name -> what it refers to, for every import statement in `lines`."""
    found: dict[str, Imported] = {}
    # Only lines naming "import" can start a statement (a C-speed filter first: most don't).
    candidates = [i for i, text in enumerate(lines) if "import" in text]
    index = 0  # the first line not consumed by a statement yet
    for start in candidates:
        if start < index:  # a continuation line of the statement before
            continue
        line = lines[start]
        index = start + 1
        statement = line.split("#", 1)[0]
        if "(" in statement and ")" not in statement:  # from x import (a,\n b)
            while index < len(lines) and ")" not in statement:
                statement += " " + lines[index].split("#", 1)[0]
                index += 1
        statement = statement.replace("(", " ").replace(")", " ").replace("\\", " ")
        if match := _FROM.match(statement):
            module = match.group(1) + match.group(2)
            for part in match.group(3).split(","):
                words = part.split()
                if not words or words[0] == "*":
                    continue
                local = words[2] if len(words) == 3 and words[1] == "as" else words[0]
                found[local] = Imported(module, words[0])
        elif match := _IMPORT.match(statement):
            for part in match.group(1).split(","):
                words = part.split()
                if not words:
                    continue
                if len(words) == 3 and words[1] == "as":
                    found[words[2]] = Imported(words[0], None)
                else:
                    found[words[0].split(".")[0]] = Imported(words[0].split(".")[0], None)
    return found


@dataclass(frozen=True)
class ImportScan:
    """What one version of a file imports, and the first line (0-based, import lines left
    out) that uses each `from`-imported name: computed once per version, so a gathering at
    another cursor of the same text costs dictionary look-ups (definitions_near)."""

    imports: dict[str, Imported]
    first_use: dict[str, int]


def scan_imports(lines: list[str]) -> ImportScan:
    imports = parse_imports(lines)
    wanted = {local for local, imp in imports.items() if imp.name is not None}
    first_use: dict[str, int] = {}
    if wanted:
        for index, text in enumerate(lines):
            if text.lstrip().startswith(("import ", "from ")):
                continue
            found = wanted.intersection(_IDENTIFIER.findall(text))
            if found:
                for name in found:
                    first_use[name] = index
                wanted -= found
                if not wanted:
                    break
    return ImportScan(imports, first_use)


def used_names(lines: list[str], line: int) -> list[str]:
    """Dotted names used within NEAR_LINES of `line` (0-based), nearest lines first."""
    order = sorted(range(max(0, line - NEAR_LINES), min(len(lines), line + NEAR_LINES + 1)),
                   key=lambda i: (abs(i - line), i))
    seen: dict[str, None] = {}
    for i in order:
        text = lines[i]
        if text.lstrip().startswith(("import ", "from ")):
            continue
        for name in _DOTTED.findall(text.split("#", 1)[0]):
            seen.setdefault(name)
    return list(seen)


class ImportResolver:
    """Finds the files of modules and the definitions in them, inside the workspace only."""

    def __init__(self, files: WorkspaceFiles, open_text=lambda path: None):
        self.files = files
        self._open_text = open_text  # an open document's text by real path, else None

    def text(self, path: Path) -> str | None:
        real = self.files.inside(path)
        if real is None:
            return None
        opened = self._open_text(real)
        return opened if opened is not None else self.files.read(real)

    def module_file(self, module: str, current: Path | None) -> Path | None:
        """The file of `module` (dotted; leading dots: relative to `current`), or None."""
        dots = len(module) - len(module.lstrip("."))
        parts = [p for p in module.lstrip(".").split(".") if p]
        bases: list[Path] = []
        if dots:
            if current is None:
                return None
            base = current.parent
            for _ in range(dots - 1):
                base = base.parent
            bases.append(base)
        else:
            if current is not None:
                bases.append(current.parent)  # a script importing its sibling
            for root in self.files.roots:
                bases.extend(root / folder if folder else root for folder in SOURCE_FOLDERS)
        for base in bases:
            if self.files.inside(base) is None:  # a relative import climbing out of the root
                continue
            target = base.joinpath(*parts) if parts else base
            for candidate in (target.with_suffix(".py") if parts else None,
                              target / "__init__.py"):
                # stat first (most candidates do not exist), then the containment check that
                # every read goes through
                if candidate is not None and candidate.is_file() and self.files.inside(
                    candidate
                ):
                    return candidate
        return None

    def definition(self, module_path: Path, name: str, depth: int = 0) -> Definition | None:
        """The top-level definition of `name` in the file, following `from .x import name`
        re-exports (an __init__.py's) up to MAX_REEXPORT_DEPTH."""
        text = self.text(module_path)
        if text is None:
            return None
        lines = text.split("\n")
        found = find_definition(lines, name)
        if found is not None:
            body, first, last = found
            return Definition(module_path, name, body, first + 1, last + 1)
        if depth >= MAX_REEXPORT_DEPTH:
            return None
        imported = parse_imports(lines).get(name)
        if imported is None or imported.name is None:
            return None
        target = self.module_file(imported.module, module_path)
        if target is None:
            return None
        return self.definition(target, imported.name, depth + 1)

    def definitions_near(
        self, lines: list[str], line: int, current: Path | None, limit: int = 8,
        scan: ImportScan | None = None,
    ) -> list[Definition]:
        """Definitions of the imported names used near `line` (nearest use first), then of
        those imported and not used before `line` yet. `scan`: scan_imports(lines), when the
        caller keeps it per version."""
        if scan is None:
            scan = scan_imports(lines)
        imports = scan.imports
        out: list[Definition] = []
        seen: set[tuple[Path, str]] = set()
        near = used_names(lines, line)
        # Then names imported but not used before the cursor yet: what is about to be used
        # (the cursor may be on the very first use, which the hole does not show).
        pending = [local for local, imp in imports.items()
                   if imp.name is not None and scan.first_use.get(local, line + 1) > line]
        for dotted in [*near, *pending]:
            head, *rest = dotted.split(".")
            imported = imports.get(head)
            if imported is None:
                continue
            for module, name in self._targets(imported, rest):
                path = self.module_file(module, current)
                if path is None or (path, name) in seen:
                    continue
                seen.add((path, name))
                found = self.definition(path, name)
                if found is not None:
                    out.append(found)
                break
            if len(out) >= limit:
                break
        return out

    def _targets(self, imported: Imported, rest: list[str]) -> list[tuple[str, str]]:
        """(module, name) pairs to try for a use `head.rest...` of an imported name."""
        if imported.name is None:  # import a.b as m; m.f / m.sub.f
            if not rest:
                return []
            pairs = []
            for cut in range(len(rest) - 1, -1, -1):
                module = ".".join([imported.module, *rest[:cut]])
                pairs.append((module, rest[cut]))
            return pairs
        pairs = [(imported.module, imported.name)]
        if rest:  # from pkg import sub; sub.f
            sep = "" if imported.module.endswith(".") else "."
            pairs.insert(0, (f"{imported.module}{sep}{imported.name}", rest[0]))
        return pairs


def find_definition(lines: list[str], name: str) -> tuple[str, int, int] | None:
    """Signature text of the top-level `def`/`class`/assignment of `name`, with its first and
    last 0-based line; None when the file does not define it at top level."""
    for index, line in enumerate(lines):
        if not line or line[0] in " \t#":
            continue
        match = _TOP_DEF.match(line) or _TOP_ASSIGN.match(line)
        if match is None or match.group(1) != name:
            continue
        first = index
        while first > 0 and lines[first - 1].startswith("@"):
            first -= 1
        if _TOP_ASSIGN.match(line) and not _TOP_DEF.match(line):
            return line[:200], index, index
        header_end = _header_end(lines, index)
        kept = lines[first : header_end + 1]
        last = header_end
        doc = _docstring_line(lines, header_end + 1)
        if doc is not None:
            kept.append(lines[doc])
            last = doc
        if line.startswith("class"):
            members, last = _class_members(lines, max(last, header_end) + 1, last)
            kept.extend(members)
        return "\n".join(kept), first, last
    return None


def _header_end(lines: list[str], index: int) -> int:
    depth = 0
    for i in range(index, min(len(lines), index + MAX_HEADER_LINES)):
        code = lines[i].split("#", 1)[0]
        depth += code.count("(") + code.count("[") - code.count(")") - code.count("]")
        if depth <= 0 and code.rstrip().endswith(":"):
            return i
    return index


def _docstring_line(lines: list[str], start: int) -> int | None:
    for i in range(start, min(len(lines), start + 3)):
        stripped = lines[i].strip()
        if not stripped:
            continue
        return i if stripped.startswith(('"""', "'''", 'r"""', '"', "'")) else None
    return None


def _class_members(lines: list[str], start: int, last: int) -> tuple[list[str], int]:
    """Field lines and method headers at the class body's own indentation."""
    members: list[str] = []
    indent = None
    i = start
    while i < len(lines) and len(members) < MAX_CLASS_LINES:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        width = len(line) - len(line.lstrip())
        if width == 0:
            break
        if indent is None:
            indent = width
        if width == indent and _MEMBER.match(line.lstrip()):
            end = _header_end(lines, i) if line.lstrip().startswith(("def", "async")) else i
            members.extend(lines[i : end + 1])
            last = end
            i = end + 1
            continue
        i += 1
    return members, last
