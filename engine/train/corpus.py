"""Deterministic training-corpus selection for the embedded model.

Sources are Python files that exist wherever maskfill is installed: the standard library and the
sources of the packages installed next to maskfill. Selection is reproducible: candidate files
are listed in sorted order, shuffled with a seeded RNG, and taken until a byte budget is met. Two
kinds of files are never taken: anything under the FIM benchmark folder, and any file that shares
a word n-gram with a HumanEval problem (prompt, canonical solution, tests), so the eval cannot be
contaminated through a package that happens to vendor HumanEval text. The HumanEval file ships
with maskfill (engine/eval/benchmark_data.py); selection refuses to run without it. Files are read
and checked by a pool of processes, in order, so the result does not depend on the worker count.

The selection is recorded as a manifest (file keys with content hashes, a hash of the whole list,
byte and token counts) that ships next to the checkpoint; `engine.eval.harness` re-reads it for its
overlap check.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import random
import re
import site
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.eval.benchmark_data import HUMANEVAL_SINGLE, benchmark_file
from engine.eval.benchmark_data import benchmark_dir as resolve_benchmark_dir

NGRAM = 10  # words; ten identical words in a row are not a coincidence in code or prose
MAX_FILE_BYTES = 200_000  # generated tables and vendored blobs teach little
MAX_LINE_CHARS = 400  # minified or data-only files
SKIP_DIR_NAMES = {"__pycache__", "site-packages", "dist-packages", ".git", "node_modules"}
# Test suites were 40% of the first corpus's bytes and taught the model to answer every hole with
# `self.assertEqual(...)`; completions are asked for in application code.
_TEST_FILE = re.compile(r"(^|/)(tests?|idle_test|testing)/|(^|/)test_[^/]*\.py$|_tests?\.py$")

_WORD = re.compile(r"\w+")


@dataclass
class CorpusFile:
    key: str  # "<root name>/<relative path>": stable across machines
    path: Path
    sha256: str
    n_bytes: int


@dataclass
class CorpusManifest:
    seed: int
    max_bytes: int
    roots: dict[str, str]  # root name -> absolute path on the machine that built it
    files: list[CorpusFile] = field(default_factory=list)
    excluded_overlap: list[str] = field(default_factory=list)  # keys dropped for HumanEval text
    n_tokens: int | None = None  # filled in once a tokenizer exists

    @property
    def n_bytes(self) -> int:
        return sum(f.n_bytes for f in self.files)

    @property
    def list_hash(self) -> str:
        lines = "\n".join(f"{f.key}\t{f.sha256}" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "max_bytes": self.max_bytes,
            "roots": self.roots,
            "n_files": len(self.files),
            "n_bytes": self.n_bytes,
            "n_tokens": self.n_tokens,
            "list_sha256": self.list_hash,
            "excluded_for_humaneval_overlap": self.excluded_overlap,
            "files": [[f.key, f.sha256, f.n_bytes] for f in self.files],
        }

    def save(self, path: Path) -> None:
        """gzip-compressed JSON: the file list is long and compresses ~10x."""
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            json.dump(self.to_json(), fh, indent=0)

    @classmethod
    def load(cls, path: Path) -> CorpusManifest:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            raw = json.load(fh)
        manifest = cls(seed=raw["seed"], max_bytes=raw["max_bytes"], roots=raw["roots"])
        manifest.excluded_overlap = list(raw.get("excluded_for_humaneval_overlap", []))
        manifest.n_tokens = raw.get("n_tokens")
        for key, sha, n_bytes in raw["files"]:
            root_name, _, rel = key.partition("/")
            base = Path(manifest.roots.get(root_name, ""))
            manifest.files.append(CorpusFile(key, base / rel, sha, n_bytes))
        return manifest


def default_roots() -> dict[str, Path]:
    """The standard library, then this interpreter's package folders (the project's
    dependencies): sysconfig's purelib/platlib and site's folders, which differ on some system
    Pythons (Debian's dist-packages). The first is "site-packages", others are named by folder."""
    paths = sysconfig.get_paths()
    roots = {"stdlib": Path(paths["stdlib"])}
    seen: list[Path] = []
    for folder in (paths["purelib"], paths["platlib"], *site.getsitepackages()):
        path = Path(folder)
        real = path.resolve()
        if not path.is_dir() or any(real == s or real.is_relative_to(s) for s in seen):
            continue
        seen.append(real)
        name = "site-packages" if len(seen) == 1 else path.name
        while name in roots:
            name += "+"
        roots[name] = path
    return roots


def word_ngrams(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of the n-grams of word tokens: whitespace, punctuation and formatting are ignored."""
    # Runs of numbers ("1 2 3 4 ...", "0 0 0 ...") occur everywhere: _hashed keeps only grams of
    # mostly real words.
    return _hashed(_WORD.findall(text.lower()), n)


@dataclass
class BenchmarkProblem:
    problem_id: str  # "HumanEval/0"
    text: str  # prompt + canonical solution + tests, as one program
    grams: set[int]


def humaneval_problems(folder: Path | None = None) -> list[BenchmarkProblem]:
    """Whole HumanEval problems, rebuilt from the single-line infilling file (every problem's
    prompt + middle + suffix is its full reference solution)."""
    return humaneval_problems_from(benchmark_file(HUMANEVAL_SINGLE, folder))


def humaneval_problems_from(path: Path) -> list[BenchmarkProblem]:
    problems: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            problem_id = record["task_id"].split("/", 1)[1].rsplit("/", 1)[0]
            if problem_id not in problems:
                program = record["prompt"] + record["canonical_solution"] + record["suffix"]
                problems[problem_id] = program + "\n" + record["test"]
    return [BenchmarkProblem(pid, text, word_ngrams(text)) for pid, text in problems.items()]


def _candidate_files(roots: dict[str, Path], exclude: Iterable[Path]) -> Iterator[tuple[str, Path]]:
    excluded = [p.resolve() for p in exclude]
    for name, root in sorted(roots.items()):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if name == "stdlib" and any(part in SKIP_DIR_NAMES for part in rel.parts[:-1]):
                continue
            if "__pycache__" in rel.parts:
                continue
            resolved = path.resolve()
            if any(resolved.is_relative_to(e) for e in excluded):
                continue
            yield f"{name}/{rel.as_posix()}", path


def is_test_file(key: str) -> bool:
    """True for files of a test suite (a `test`/`tests` folder, `test_*.py`, `*_test.py`)."""
    return _TEST_FILE.search(key) is not None


def read_source(path: Path) -> str | None:
    """File text if it is usable training code, else None (binary, huge, minified, not UTF-8)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw or len(raw) > MAX_FILE_BYTES or b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if max((len(line) for line in text.splitlines()), default=0) > MAX_LINE_CHARS:
        return None
    return text


def select_corpus(
    *,
    seed: int = 0,
    max_bytes: int = 48_000_000,
    roots: dict[str, Path] | None = None,
    benchmark_dir: Path | None = None,
    extra_excludes: Iterable[Path] = (),
    skip_tests: bool = True,
    workers: int | None = None,
) -> tuple[CorpusManifest, list[str]]:
    """Pick files until `max_bytes`; returns the manifest and the texts in manifest order.
    `benchmark_dir` overrides where the HumanEval file is read (engine/eval/benchmark_data.py);
    `workers` processes read and check files (default: one per CPU)."""
    roots = roots or default_roots()
    humaneval = benchmark_file(HUMANEVAL_SINGLE, benchmark_dir)  # no decontamination, no corpus
    project_root = Path(__file__).resolve().parents[2]
    own_sources = [project_root / name for name in ("engine", "lsp_server", "tests", "editors")]
    exclude = [resolve_benchmark_dir(benchmark_dir), *own_sources, *extra_excludes]
    # Roots in the order given (stdlib first: the most idiomatic Python), each shuffled on its own.
    rng = random.Random(seed)
    candidates: list[tuple[str, Path]] = []
    for name, root in roots.items():
        files = [(key, path) for key, path in _candidate_files({name: root}, exclude)
                 if not (skip_tests and is_test_file(key))]
        rng.shuffle(files)
        candidates += files

    manifest = CorpusManifest(seed=seed, max_bytes=max_bytes,
                              roots={k: str(v) for k, v in roots.items()})
    chosen: list[tuple[CorpusFile, str]] = []
    total = 0
    with _checker(humaneval, workers) as check:
        # Chunks in candidate order: the budget stops the walk at the same file for any pool size.
        for lo in range(0, len(candidates), CHECK_CHUNK):
            if total >= max_bytes:
                break
            chunk = candidates[lo : lo + CHECK_CHUNK]
            for (key, path), (text, overlaps) in zip(chunk, check([p for _, p in chunk]),
                                                     strict=True):
                if total >= max_bytes:
                    break
                if text is None:
                    continue
                if overlaps:
                    manifest.excluded_overlap.append(key)
                    continue
                raw = text.encode("utf-8")
                chosen.append((CorpusFile(key, path, hashlib.sha256(raw).hexdigest(), len(raw)),
                               text))
                total += len(raw)
    chosen.sort(key=lambda item: item[0].key)  # manifest order is sorted, not shuffled
    manifest.files = [f for f, _ in chosen]
    manifest.excluded_overlap.sort()
    return manifest, [text for _, text in chosen]


CHECK_CHUNK = 512  # files handed to the pool at a time


# Worker state: each process builds the benchmark n-grams itself, because hash() of a string is
# salted per process and the n-gram sets hold hashes.
_BENCHMARK_GRAMS: set[int] = set()
_BENCHMARK_WORDS: frozenset[str] = frozenset()


def _init_checker(humaneval: str) -> None:
    global _BENCHMARK_GRAMS, _BENCHMARK_WORDS
    problems = humaneval_problems_from(Path(humaneval))
    _BENCHMARK_GRAMS = set().union(*(p.grams for p in problems))
    _BENCHMARK_WORDS = frozenset(w for p in problems for w in _WORD.findall(p.text.lower()))


def shares_ngram(text: str, grams: set[int], vocabulary: frozenset[str]) -> bool:
    """Whether `text` has a word n-gram in `grams` (as word_ngrams hashes them). Only runs of
    words that all occur in the benchmark (`vocabulary`) can match, so only those are hashed:
    same answer as `not grams.isdisjoint(word_ngrams(text))`, several times faster on code."""
    run: list[str] = []
    for word in _WORD.findall(text.lower()):
        if word not in vocabulary:
            if len(run) >= NGRAM and not grams.isdisjoint(_hashed(run)):
                return True
            run = []
        else:
            run.append(word)
    return len(run) >= NGRAM and not grams.isdisjoint(_hashed(run))


def _hashed(words: list[str], n: int = NGRAM) -> set[int]:
    grams = (tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return {hash(g) for g in grams if sum(not w.isdigit() for w in g) >= n // 2 + 1}


def _check_file(path: Path) -> tuple[str | None, bool]:
    """(usable text or None, shares a word 10-gram with HumanEval)."""
    text = read_source(path)
    if text is None:
        return None, False
    return text, shares_ngram(text, _BENCHMARK_GRAMS, _BENCHMARK_WORDS)


class _checker:
    """Context manager giving `check(paths) -> [(text, overlaps)]`, in a pool or in-process."""

    def __init__(self, humaneval: Path, workers: int | None):
        self.humaneval = str(humaneval)
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.pool = None

    def __enter__(self):
        if self.workers == 1:
            _init_checker(self.humaneval)
            return lambda paths: [_check_file(p) for p in paths]
        # spawn: a clean interpreter per worker (the parent may hold torch and CUDA state).
        ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(self.workers, initializer=_init_checker, initargs=(self.humaneval,))
        return lambda paths: self.pool.map(_check_file, paths, chunksize=8)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def load_corpus_texts(manifest: CorpusManifest, keep: Callable[[str], bool] | None = None
                      ) -> tuple[list[str], int]:
    """Texts of the manifest's files that are present and unchanged here (and pass `keep`, a
    predicate on the file key); also the count missing."""
    files, missing = load_corpus_files(manifest, keep)
    return [text for _, text in files], missing


def load_corpus_files(manifest: CorpusManifest, keep: Callable[[str], bool] | None = None
                      ) -> tuple[list[tuple[str, str]], int]:
    """(key, text) of the manifest's files present and unchanged here; also the count missing."""
    files, missing = [], 0
    for f in manifest.files:
        if keep is not None and not keep(f.key):
            continue
        text = read_source(f.path)
        if text is None or hashlib.sha256(text.encode("utf-8")).hexdigest() != f.sha256:
            missing += 1
            continue
        files.append((f.key, text))
    return files, missing
