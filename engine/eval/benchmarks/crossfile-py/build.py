"""Build the local cross-file Python set with CrossCodeEval's recipe (design/context.md §4).

    python engine/eval/benchmarks/crossfile-py/build.py WHEEL [WHEEL ...]

Each WHEEL is a pure-Python package's wheel (pip download --no-deps --only-binary :all:
NAME==VERSION), chosen because no file of it is in the embedded model's training corpus
(engine/model/embedded/corpus.json.gz lists that corpus; this script refuses a package it names).
Per package: its .py files and licence files are copied into the set; per module, every name
imported from another module of the package, at its first use in the module, makes one item:
the hole runs from the use to the end of the line (the whole file around it as prefix and
suffix), and the oracle is the module that defines the name. Written next to this script:
repos.jsonl.gz, items.jsonl.gz, LICENSES/<package>/..., and the counts in MANIFEST.json; then
contexts.jsonl.gz, each item's context per condition as the LSP server's gatherer picks it
(`python -m lsp_server.context.crossfile --write-contexts`, run from the repository root: the
engine's eval reads the stored chunks and never imports the server).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
PER_FILE = 8  # items per module at most, evenly spread over its cross-file uses
PER_PACKAGE = 100
MIN_REFERENCE, MAX_REFERENCE = 4, 120  # characters of the rest of the line
# Files a package says it copied from the standard library, which the embedded model was
# trained on: no hole in them, and no item whose oracle is one of them.
FROM_STDLIB = ("parso/pgen2/", "parso/tokenize.py", "parso/token.py")


@dataclass(frozen=True)
class Item:
    task_id: str
    package: str
    path: str  # the module with the hole, "/"-separated, from the package's top folder
    line: int  # 1-based
    col: int  # code points into the line
    offset: int  # code points into the file
    reference: str  # the rest of the line from the use
    name: str  # the cross-file name as written there: "Table" or "items.Table"
    oracle: str  # the module that defines it
    oracle_line: int  # where (1-based)


def module_name(path: str) -> str:
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(path: str) -> str:
    """The dotted package a module's relative imports start from."""
    name = module_name(path)
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def resolve_from(path: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = package_of(path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def top_level_names(tree: ast.Module) -> dict[str, int]:
    names: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node.lineno
    return names


class Package:
    def __init__(self, files: dict[str, str]):
        self.files = files  # path -> text
        self.modules = {module_name(p): p for p in files}
        self.trees: dict[str, ast.Module] = {}
        for path, text in files.items():
            try:
                self.trees[path] = ast.parse(text)
            except SyntaxError:
                continue

    def definition(self, module: str, name: str, depth: int = 0) -> tuple[str, int] | None:
        """(file, line) defining `name` in `module`, through re-exports."""
        path = self.modules.get(module)
        if path is None or path not in self.trees or depth > 3:
            return None
        tree = self.trees[path]
        line = top_level_names(tree).get(name)
        if line is not None:
            return path, line
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self.definition(resolve_from(path, node), alias.name, depth + 1)
        return None

    def items(self, package: str) -> list[Item]:
        out: list[Item] = []
        for path in sorted(self.trees):
            if path.startswith(FROM_STDLIB):
                continue
            out.extend(self._module_items(package, path))
        return out

    def _module_items(self, package: str, path: str) -> list[Item]:
        tree = self.trees[path]
        names: dict[str, tuple[str, str]] = {}  # local -> (module, name): a defined name
        aliases: dict[str, str] = {}  # local -> module: a sibling module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = resolve_from(path, node)
                if module.split(".")[0] not in {m.split(".")[0] for m in self.modules}:
                    continue
                for alias in node.names:
                    local = alias.asname or alias.name
                    if f"{module}.{alias.name}" in self.modules:
                        aliases[local] = f"{module}.{alias.name}"
                    elif module in self.modules:
                        names[local] = (module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in self.modules and alias.asname:
                        aliases[alias.asname] = alias.name
        text = self.files[path]
        lines = text.split("\n")
        seen: set[str] = set()
        uses: list[Item] = []
        nodes = sorted(
            (n for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.Attribute))),
            key=lambda n: (n.lineno, n.col_offset),
        )
        for node in nodes:
            if node.lineno != node.end_lineno:
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and (
                node.id in names
            ):
                written, (module, name) = node.id, names[node.id]
                byte_col = node.col_offset
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                node.value.id in aliases
            ):
                written, module, name = f"{node.value.id}.{node.attr}", aliases[node.value.id], (
                    node.attr)
                byte_col = node.end_col_offset - len(node.attr.encode("utf-8"))
            else:
                continue
            if written in seen:
                continue
            seen.add(written)
            found = self.definition(module, name)
            if found is None or found[0] == path or found[0].startswith(FROM_STDLIB):
                continue
            line_text = lines[node.lineno - 1]
            col = len(line_text.encode("utf-8")[:byte_col].decode("utf-8", "replace"))
            reference = line_text[col:].rstrip()
            if not MIN_REFERENCE <= len(reference) <= MAX_REFERENCE:
                continue
            offset = sum(len(x) + 1 for x in lines[: node.lineno - 1]) + col
            uses.append(Item(
                task_id=f"crossfile-py/{package}/{path}:{node.lineno}:{col + 1}",
                package=package, path=path, line=node.lineno, col=col, offset=offset,
                reference=reference, name=written, oracle=found[0], oracle_line=found[1],
            ))
        if len(uses) > PER_FILE:
            uses = [uses[i * len(uses) // PER_FILE] for i in range(PER_FILE)]
        return uses


def corpus_packages() -> set[str]:
    manifest = HERE.parents[2] / "model" / "embedded" / "corpus.json.gz"
    with gzip.open(manifest, "rt", encoding="utf-8") as fh:
        files = json.load(fh)["files"]
    return {entry[0].split("/")[1] for entry in files if entry[0].startswith("site-packages/")}


def read_wheel(wheel: Path) -> tuple[str, str, dict[str, str], dict[str, bytes]]:
    """(distribution, version, .py files by path, licence files by name)."""
    dist, version = wheel.name.split("-")[:2]
    sources: dict[str, str] = {}
    licences: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if ".dist-info/" in name:
                leaf = name.split("/")[-1]
                in_licenses = "licenses" in name.split("/")[:-1]
                if in_licenses or leaf.upper().startswith(("LICEN", "COPYING", "NOTICE")):
                    licences[leaf] = archive.read(name)
            elif name.endswith(".py"):
                sources[name] = archive.read(name).decode("utf-8")
    return dist, version, sources, licences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheels", nargs="+", type=Path)
    args = parser.parse_args(argv)
    trained = corpus_packages()
    repos, items, manifest = [], [], []
    for wheel in sorted(args.wheels):
        dist, version, sources, licences = read_wheel(wheel)
        tops = {path.split("/")[0].removesuffix(".py") for path in sources}
        if tops & trained:
            print(f"{wheel.name}: {sorted(tops & trained)} is in the training corpus; skipped",
                  file=sys.stderr)
            continue
        if not licences:
            print(f"{wheel.name}: no licence file; skipped", file=sys.stderr)
            continue
        package_items = Package(sources).items(dist)[:PER_PACKAGE]
        items.extend(package_items)
        for path, text in sources.items():
            repos.append({"package": dist, "version": version, "path": path, "text": text})
        folder = HERE / "LICENSES" / dist
        folder.mkdir(parents=True, exist_ok=True)
        for leaf, data in licences.items():
            (folder / leaf).write_bytes(data)
        manifest.append({
            "package": dist, "version": version, "wheel": wheel.name,
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "files": len(sources), "items": len(package_items),
            "licence_files": sorted(licences),
        })
    _write_jsonl(HERE / "repos.jsonl.gz", repos)
    _write_jsonl(HERE / "items.jsonl.gz", [asdict(item) for item in items])
    summary = {"packages": manifest, "items": len(items), "per_file": PER_FILE,
               "per_package": PER_PACKAGE, "excluded_as_copied_from_stdlib": list(FROM_STDLIB)}
    (HERE / "MANIFEST.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"{len(items)} items from {len(manifest)} packages")
    return subprocess.call([sys.executable, "-m", "lsp_server.context.crossfile",
                            "--write-contexts"], cwd=HERE.parents[3])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # mtime 0: the same input gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())
