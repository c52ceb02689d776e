"""The training corpus tokenized once: a flat uint16 token array with per-file and per-line offsets.

Files are encoded by a pool of processes (`tokenizers` encode_batch within each); the token offset
mapping the tokenizer returns gives, for every file, the index of the token that starts each line.
Everything is stored as .npy arrays plus a JSON file (no pickle) under the run folder, so a resumed
run reuses it and the row sampler (engine/train/row_sampler.py) cuts rows by index arithmetic.

Layout (all indices are global token positions):
- tokens       uint16 (N,)   every file's tokens, files back to back in manifest order
- file_starts  int64 (F+1,)  file f is tokens[file_starts[f]:file_starts[f+1]]
- line_starts  int64 (M,)    first token of each line that starts on a token boundary, sorted
- file_lines   int64 (F+1,)  file f's lines are line_starts[file_lines[f]:file_lines[f+1]]
- meta.json    keys (manifest file keys, in order), tokenizer and file-list hashes, counts
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARRAYS = ("tokens", "file_starts", "line_starts", "file_lines")
META = "meta.json"
MAX_VOCAB = 1 << 16  # ids must fit uint16


@dataclass
class TokenCorpus:
    tokens: np.ndarray
    file_starts: np.ndarray
    line_starts: np.ndarray
    file_lines: np.ndarray
    keys: list[str]
    meta: dict

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_files(self) -> int:
        return len(self.keys)

    def file_tokens(self, index: int) -> np.ndarray:
        return self.tokens[self.file_starts[index] : self.file_starts[index + 1]]

    def save(self, folder: Path) -> None:
        """Arrays first, meta.json last (atomically): a folder with meta.json is complete."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name), allow_pickle=False)
        tmp = folder / (META + ".tmp")
        tmp.write_text(json.dumps({**self.meta, "keys": self.keys}), encoding="utf-8")
        os.replace(tmp, folder / META)

    @classmethod
    def load(cls, folder: Path) -> TokenCorpus:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        keys = meta.pop("keys")
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in ARRAYS}
        return cls(**arrays, keys=keys, meta=meta)

    @staticmethod
    def stored(folder: Path) -> dict | None:
        """The meta of a complete stored corpus (without its keys), or None."""
        path = folder / META
        if not path.is_file():
            return None
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta.pop("keys", None)
        return meta


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_token_corpus(keys: Sequence[str], texts: Sequence[str], tokenizer_file: Path, *,
                       list_sha256: str, workers: int | None = None) -> TokenCorpus:
    """Tokenize `texts` (keyed by `keys`, in that order) with the tokenizer.json at
    `tokenizer_file`, in `workers` processes (default: one per CPU; 1 = in this process)."""
    if len(keys) != len(texts):
        raise ValueError(f"{len(keys)} keys for {len(texts)} texts")
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    chunks = _chunks(texts, max(1, 4 * workers) if workers > 1 else 1)
    if workers == 1:
        _init_worker(str(tokenizer_file), parallel=True)
        parts = [_encode_chunk(chunk) for chunk in chunks]
    else:
        # spawn: a clean interpreter per worker (the parent may hold torch/CUDA state and a
        # tokenizer whose thread pool does not survive fork).
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(chunks)), initializer=_init_worker,
                      initargs=(str(tokenizer_file), False)) as pool:
            parts = pool.map(_encode_chunk, chunks)
    tokens = _concat([p[0] for p in parts], np.uint16)
    lengths = _concat([p[1] for p in parts], np.int64)
    local_lines = _concat([p[2] for p in parts], np.int64)
    n_lines = _concat([p[3] for p in parts], np.int64)
    file_starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    file_lines = np.concatenate(([0], np.cumsum(n_lines))).astype(np.int64)
    # Per-file line starts are file-relative: shift each file's block by its first token.
    line_starts = local_lines + np.repeat(file_starts[:-1], n_lines)
    meta = {"tokenizer_sha256": file_sha256(tokenizer_file), "list_sha256": list_sha256,
            "n_tokens": int(tokens.shape[0]), "n_files": len(keys),
            "n_lines": int(line_starts.shape[0])}
    return TokenCorpus(tokens, file_starts, line_starts.astype(np.int64), file_lines,
                       list(keys), meta)


def _chunks(texts: Sequence[str], n: int) -> list[list[str]]:
    """`texts` split in order into about `n` runs of similar byte size."""
    total = sum(len(t) for t in texts) or 1
    chunks: list[list[str]] = [[]]
    size = 0
    for text in texts:
        if size >= total / n and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(text)
        size += len(text)
    return [c for c in chunks if c]


_TOKENIZER = None


def _init_worker(tokenizer_file: str, parallel: bool) -> None:
    global _TOKENIZER
    if not parallel:  # one process per core already: no thread pool inside each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(tokenizer_file)
    # As engine/model/tokenizer.py: special-token text inside a file is text, never a control token.
    _TOKENIZER.encode_special_tokens = True
    if _TOKENIZER.get_vocab_size(with_added_tokens=True) > MAX_VOCAB:
        raise ValueError(f"{tokenizer_file}: more than {MAX_VOCAB} tokens do not fit uint16")


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, tokens per file, file-relative line-start token indices, lines per file)."""
    encodings = _TOKENIZER.encode_batch(texts, add_special_tokens=False)
    ids, lengths, lines, n_lines = [], [], [], []
    for text, enc in zip(texts, encodings, strict=True):
        ids.append(np.asarray(enc.ids, dtype=np.uint16))
        starts = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        found = line_start_tokens(text, starts)
        lengths.append(len(enc.ids))
        lines.append(found)
        n_lines.append(len(found))
    return (_concat(ids, np.uint16), np.asarray(lengths, np.int64), _concat(lines, np.int64),
            np.asarray(n_lines, np.int64))


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def line_start_tokens(text: str, token_char_starts: np.ndarray) -> np.ndarray:
    """Indices of the tokens whose first character starts a line of `text` (the first token, and
    each token starting right after a newline). A line whose start falls inside a token (a blank
    line inside a run of newlines) has none and is not listed."""
    if token_char_starts.shape[0] == 0:
        return np.zeros(0, np.int64)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    after_newline = np.flatnonzero(codes == 10) + 1
    line_chars = np.concatenate(([0], after_newline[after_newline < len(codes)]))
    # Several tokens share a start when a character spans bytes: the first one begins the line.
    index = np.searchsorted(token_char_starts, line_chars, side="left")
    inside = index < token_char_starts.shape[0]
    index, line_chars = index[inside], line_chars[inside]
    return index[token_char_starts[index] == line_chars].astype(np.int64)
