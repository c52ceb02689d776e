"""A JSON record of a run, rewritten whole after every change (written aside, then renamed),
so a run killed at any moment leaves the last complete version: what make gpu-check and make
train-gpu bring back from a lent GPU machine whose call ran out of time. Stdlib only."""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonRecord:
    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    def write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(partial, self.path)
