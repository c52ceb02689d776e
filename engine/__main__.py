"""Command line: `python -m engine complete ...`, `... bench ...`, `... serve ...`, `... token`,
`... cluster ...`.

Every failure a user can cause (missing or corrupt checkpoint, bad position, unreadable
file, a model that does not fit) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import get_args

from engine.api import CompletionRequest, EngineError, QuantMode
from engine.serve.cli import add_serve_parser, add_token_parser, run_serve, run_token
from engine.serve.cluster.cli import add_cluster_parser, run_cluster
from engine.stop import stop_for_cursor

MAX_FILE_BYTES = 16 * 1024 * 1024  # beyond this a "source file" is not something we complete in
STOP_HELP = (
    "where the completion ends: auto (the editors' default, as the server decides it: text after "
    "the cursor -> the rest of the line; an empty line or one ending in ':', '{', '(' or '[' -> "
    "a block; the end of another line -> the next line), line, block, or free (all the model "
    "wrote); "
    "default: auto"
)


def _default_model() -> str | None:
    try:
        from engine.model.embedded_model import default_model_path
    except ImportError:
        return None
    path = default_model_path()
    return str(path) if path is not None else None


def read_source(path: Path) -> str:
    """Read a text file the way an editor would, refusing what is not source code."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise EngineError(f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise EngineError(f"{path} is {size} bytes; files over {MAX_FILE_BYTES} bytes are refused")
    try:
        data = path.read_bytes()
    except OSError as exc:  # a directory, a permission problem, a vanished file
        raise EngineError(f"cannot read {path}: {exc.strerror}") from None
    if b"\x00" in data:
        raise EngineError(f"{path} looks binary (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EngineError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def split_at(text: str, line: int, col: int) -> tuple[str, str]:
    """Split text at a position: 1-based line, 0-based character (code points before it)."""
    # Editors break lines at \n, \r\n and \r only (str.splitlines also breaks at \f, \x85, ...).
    lines = re.split(r"(?<=\r\n)|(?<=\n)|(?<=\r)(?!\n)", text)
    if not 1 <= line <= len(lines):
        raise EngineError(f"line {line} is outside the file (1..{len(lines)})")
    body = lines[line - 1].rstrip("\r\n")
    if not 0 <= col <= len(body):
        raise EngineError(f"column {col} is outside line {line} (0..{len(body)})")
    offset = sum(len(s) for s in lines[: line - 1]) + col
    return text[:offset], text[offset:]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--quant", default="none", choices=get_args(QuantMode))


def program_name(argv0: str | None = None) -> str:
    """What the user typed: the console script (`maskfill-engine`), else `python -m engine`."""
    name = Path(argv0 if argv0 is not None else sys.argv[0]).name
    if name.lower().endswith(".exe"):  # the Windows launcher
        name = name[:-4]
    return "python -m engine" if not name or name.endswith(".py") or name == "-c" else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "complete",
        help="fill the middle at a position of a file",
        description="Complete a file at a cursor position. LINE is 1-based, as editors show it; "
        "COL is 0-based: the number of characters (Unicode code points) before the cursor in that "
        "line. Editors show columns 1-based (VS Code's 'Col 9' is --col 8).",
    )
    c.add_argument("--model", default=None, help="checkpoint folder or Hugging Face repo id "
                   "(resolved from the local HF cache only); default: the embedded model")
    c.add_argument("--file", required=True, type=Path)
    c.add_argument("--line", required=True, type=int, help="1-based line number")
    c.add_argument("--col", required=True, type=int,
                   help="0-based: characters before the cursor (an editor's column minus 1)")
    _add_model_args(c)
    c.add_argument("--max-tokens", type=int, default=64, help="span budget in tokens")
    c.add_argument("--stop", default="auto", choices=["auto", "line", "block", "free"],
                   help=STOP_HELP)
    c.add_argument("--sampler", default="threshold", choices=[
        "threshold", "entropy_bounded", "origin", "maskgit_plus", "topk_margin", "entropy",
        "low_confidence"])
    c.add_argument("--threshold", type=float, default=0.9)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--no-cache", action="store_true", help="full forward every step (reference)")
    c.add_argument("--json", action="store_true", help="print the result as one JSON object")

    b = sub.add_parser("bench", help="speed and memory benchmarks: a table, then one JSON line "
                       "(run from a source checkout: it trains the memorized test model)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    b.add_argument("--skip-server", action="store_true", help="engine figures only")
    b.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    b.add_argument("--shape", choices=["small", "0.5b", "7b"], default=None,
                   help="measure random weights of this model shape built on the device: "
                   "encode, cached pass, 8-pass request, GPU busy time, launches, floors and "
                   "the autoregressive peer, per --quant mode")
    b.add_argument("--quant", default="none,int8,int4,fp8",
                   help="comma-separated quant modes for --shape (default: all; fp8 needs "
                   "an sm89+ GPU)")
    b.add_argument("--skip-ar", action="store_true", help="--shape: no autoregressive peer")
    add_serve_parser(sub)
    add_token_parser(sub)
    add_cluster_parser(sub)
    return parser


def run_complete(args: argparse.Namespace) -> int:
    from engine.engine import Engine

    model = args.model or _default_model()
    if model is None:
        raise EngineError("no --model given and no embedded model is installed")
    prefix, suffix = split_at(read_source(args.file), args.line, args.col)
    stop = args.stop
    if stop == "auto":
        stop = stop_for_cursor(prefix.rsplit("\n", 1)[-1], suffix.split("\n", 1)[0])
    request = CompletionRequest(
        prefix=prefix, suffix=suffix, max_tokens=args.max_tokens, stop=stop,
        sampler=args.sampler, threshold=args.threshold, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
    )
    engine = Engine.load(model, device=args.device, quant=args.quant)
    engine.use_cpu_threads()
    try:
        result = engine.complete(request)
    finally:
        engine.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(result), ensure_ascii=False, separators=(",", ":")))
        return 0
    s = result.stats
    print(result.text)
    print("---", file=sys.stderr)
    timings = " ".join(f"{k}={v:.1f}ms" for k, v in s.timings_ms.items())
    print(f"forward passes: {s.forward_passes}  committed tokens: {s.committed_tokens}  "
          f"per step: {s.tokens_committed_per_step}", file=sys.stderr)
    print(f"span: {s.span_length}  mean confidence: {s.mean_confidence:.3f}  {timings}",
          file=sys.stderr)
    print(f"stop mode: {stop}" + (" (auto)" if args.stop == "auto" else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Idle OpenMP workers of a CPU torch build spin between kernels; on a small machine that
    # starves everything else (measured ~30x slower steps beside another busy process).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if args.command == "complete":
            return run_complete(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "token":
            return run_token(args)
        if args.command == "cluster":
            return run_cluster(args)
        if args.shape is not None:
            from engine.bench.shapes import main_shape_bench

            return main_shape_bench(args.shape, args.device, args.quant, args.quick,
                                    with_ar=not args.skip_ar)
        from engine.bench.suite import run_bench

        return run_bench(device=args.device, quick=args.quick, with_server=not args.skip_server)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory while loading or running the model", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
