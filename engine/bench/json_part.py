"""A bench part run as a separate process whose last stdout line is its JSON figures."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from engine.api import EngineError

PART_TIMEOUT_S = 600.0


class BenchPartFailed(EngineError):
    """A bench part's process failed, timed out or ended without a JSON line."""


def run_json_part(command: Sequence[str], timeout_s: float = PART_TIMEOUT_S
                  ) -> tuple[dict, list[str]]:
    """Run `command`: (its last stdout line as a JSON object, the lines printed before it).
    Any way it can fail (an exit status, running past `timeout_s`, no output, a last line
    that is no JSON object) raises BenchPartFailed naming the command and the end of its
    stderr, so the bench can report the part as failed and go on."""
    shown = " ".join(command)
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchPartFailed(f"`{shown}` did not finish within {timeout_s:.0f} s") from None
    except OSError as error:
        raise BenchPartFailed(f"`{shown}` could not start: {error}") from None
    lines = done.stdout.strip().splitlines()
    tail = done.stderr.strip()[-500:]
    if done.returncode != 0:
        raise BenchPartFailed(f"`{shown}` exited with {done.returncode}: {tail}")
    try:
        figures = json.loads(lines[-1]) if lines else None
    except ValueError:
        figures = None
    if not isinstance(figures, dict):
        last = lines[-1][:200] if lines else "(no output)"
        raise BenchPartFailed(f"`{shown}` ended without a JSON line (last line: {last}); "
                              f"stderr: {tail}")
    return figures, lines[:-1]
