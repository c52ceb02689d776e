"""A workspace on disk and open documents as the server holds them (uri, language, version,
text), for the context gatherer's tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from pygls.uris import from_fs_path


@dataclass
class Doc:
    uri: str
    language_id: str
    version: int
    source: str


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.docs: dict[str, Doc] = {}

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def open(self, relative: str, text: str | None = None, language: str = "python") -> Doc:
        path = self.root / relative
        if text is None:
            text = path.read_text(encoding="utf-8")
        doc = Doc(from_fs_path(str(path)), language, 1, text)
        self.docs[doc.uri] = doc
        return doc

    def type_text(self, doc: Doc, offset: int, typed: str) -> None:
        doc.source = doc.source[:offset] + typed + doc.source[offset:]
        doc.version += 1

    def documents(self) -> list[Doc]:
        return list(self.docs.values())


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(root)


@pytest.fixture
def clock() -> Clock:
    return Clock()
