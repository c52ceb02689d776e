"""Hand-written demo files with holes, for the "does the completed file still parse" metric.

Written for maskfill (not taken from any benchmark): small everyday Python files. In each
source, `⟦...⟧` marks one hole; the text inside is what the author wrote there (the reference),
which the metric does not need but `--dump` users may compare against. A file with several holes
yields one task per hole, the other holes filled with their reference text.

Metric (engine.eval.harness --suite demo-holes): among the non-empty completions, the share whose
completed file passes `ast.parse`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.stop import stop_for_cursor

_HOLE = re.compile(r"⟦(.*?)⟧", re.DOTALL)


@dataclass(frozen=True)
class DemoHole:
    task_id: str
    prompt: str  # text before the hole
    suffix: str  # text after the hole
    reference: str  # what the author wrote in the hole
    stop: str  # the stop mode the editor's `auto` setting asks for at the hole


DEMO_FILES: dict[str, str] = {
    "inventory.py": '''\
from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 0


@dataclass
class Inventory:
    items: dict[str, Item] = field(default_factory=dict)

    def add(self, item: Item) -> None:
        if item.name in self.items:
            self.items[item.name].quantity += item.quantity
        else:
            ⟦self.items[item.name] = item⟧

    def total_value(self) -> float:
        return sum(⟦item.price * item.quantity for item in self.items.values()⟧)

    def remove(self, name: str) -> Item:
⟦        return self.items.pop(name)
⟧
    def names(self) -> list[str]:
        return sorted(self.items)
''',
    "wordcount.py": '''\
import sys
from collections import Counter


def count_words(text: str) -> Counter:
    words = [w.strip(".,;:!?").lower() for w in text.split()]
    return Counter(⟦w for w in words if w⟧)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: wordcount FILE", file=sys.stderr)
        ⟦return 2⟧
    with open(argv[1], encoding="utf-8") as fh:
        counts = count_words(fh.read())
    for word, n in counts.most_common(10):
⟦        print(f"{n:6d} {word}")
⟧    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
''',
    "geometry.py": '''\
import math


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x = x
        ⟦self.y = y⟧

    def distance_to(self, other: "Point") -> float:
        return math.hypot(⟦self.x - other.x, self.y - other.y⟧)

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


def centroid(points: list[Point]) -> Point:
    if not points:
        raise ValueError("no points")
⟦    x = sum(p.x for p in points) / len(points)
⟧    y = sum(p.y for p in points) / len(points)
    return Point(x, y)
''',
    "config_loader.py": '''\
import json
import os
from pathlib import Path

DEFAULTS = {"debug": False, "port": 8080, "host": "127.0.0.1"}


def load_config(path: Path) -> dict:
    config = dict(DEFAULTS)
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            ⟦config.update(json.load(fh))⟧
    port = os.environ.get("APP_PORT")
    if port is not None:
        config["port"] = ⟦int(port)⟧
    return config


def save_config(path: Path, config: dict) -> None:
⟦    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
⟧''',
    "stack.py": '''\
class Stack:
    """A last-in, first-out container."""

    def __init__(self):
        self._items = []

    def push(self, item):
        ⟦self._items.append(item)⟧

    def pop(self):
        if not self._items:
            raise IndexError("pop from an empty stack")
        return ⟦self._items.pop()⟧

    def peek(self):
        return self._items[-1]

    def __len__(self):
⟦        return len(self._items)
⟧
    def is_empty(self):
        return len(self._items) == 0
''',
    "retry.py": '''\
import time
from functools import wraps


def retry(times: int = 3, delay: float = 0.1):
    def decorator(func):
        @wraps(func)
        def wrapper(*args, **kwargs):
            last_error = None
            for attempt in range(times):
                try:
                    return ⟦func(*args, **kwargs)⟧
                except Exception as exc:
                    last_error = exc
                    ⟦time.sleep(delay)⟧
            raise last_error
        return wrapper
    ⟦return decorator⟧
''',
    "csv_report.py": '''\
import csv
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return ⟦list(reader)⟧


def average(rows: list[dict[str, str]], column: str) -> float:
    values = [float(row[column]) for row in rows if row.get(column)]
    if not values:
        ⟦return 0.0⟧
    return sum(values) / len(values)


def summarize(path: Path, column: str) -> str:
    rows = read_rows(path)
⟦    mean = average(rows, column)
⟧    return f"{len(rows)} rows, mean {column} = {mean:.2f}"
''',
    "matrix.py": '''\
def transpose(matrix: list[list[float]]) -> list[list[float]]:
    return [list(row) for row in zip(⟦*matrix⟧)]


def multiply(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    if len(a[0]) != len(b):
        raise ValueError("shapes do not match")
    result = []
    for row in a:
        ⟦result.append([sum(x * y for x, y in zip(row, col)) for col in zip(*b)])⟧
    return result


def identity(n: int) -> list[list[float]]:
⟦    return [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
⟧''',
    "bank.py": '''\
class InsufficientFunds(Exception):
    pass


class Account:
    def __init__(self, owner: str, balance: float = 0.0):
        self.owner = owner
        self.balance = balance

    def deposit(self, amount: float) -> None:
        if amount <= 0:
            raise ValueError("deposit must be positive")
        ⟦self.balance += amount⟧

    def withdraw(self, amount: float) -> None:
        if amount > self.balance:
            ⟦raise InsufficientFunds(f"{self.owner} has only {self.balance}")⟧
        self.balance -= amount

    def __str__(self) -> str:
        return ⟦f"{self.owner}: {self.balance:.2f}"⟧
''',
    "text_utils.py": '''\
import re


def slugify(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower())
    return ⟦slug.strip("-")⟧


def truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    ⟦return text[: width - 3] + "..."⟧


def is_palindrome(text: str) -> bool:
    cleaned = [c.lower() for c in text if c.isalnum()]
⟦    return cleaned == cleaned[::-1]
⟧''',
}


def demo_holes() -> list[DemoHole]:
    holes: list[DemoHole] = []
    for name, source in DEMO_FILES.items():
        spans = list(_HOLE.finditer(source))
        for i, target in enumerate(spans):
            prompt = _fill(source[: target.start()])
            suffix = _fill(source[target.end() :])
            reference = target.group(1)
            stop = stop_for_cursor(prompt.rsplit("\n", 1)[-1], suffix.split("\n", 1)[0])
            holes.append(DemoHole(task_id=f"demo/{name}/{i}", prompt=prompt, suffix=suffix,
                                  reference=reference, stop=stop))
    return holes


def _fill(text: str) -> str:
    """Other holes of the same file: their reference text."""
    return _HOLE.sub(lambda m: m.group(1), text)


def full_source(name: str) -> str:
    """A demo file with every hole filled by its reference."""
    return _fill(DEMO_FILES[name])
