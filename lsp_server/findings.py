"""One line of `maskfill-lsp --check`: a status, what was looked at, and what was found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "info", "warn", "fail"]
# Fixed labels: editors (Neovim's :checkhealth maskfill) read a line's status from its first word.
LABELS: dict[Status, str] = {"ok": "ok", "info": "info", "warn": "warn", "fail": "FAIL"}


@dataclass(frozen=True)
class Finding:
    status: Status
    topic: str  # torch, cuda, device, xformers, torchao, model, memory
    text: str

    def line(self) -> str:
        return f"{LABELS[self.status]:<5} {self.topic:<9} {self.text}"
