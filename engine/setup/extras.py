"""The command that installs an optional feature's packages, for the hints printed when one is
missing.

The hint names the packages themselves and the interpreter that needs them, never
`pip install 'maskfill[extra]'`: maskfill is not on PyPI under that name, so in any environment
but a source checkout's own, pip resolves `maskfill` to an unrelated PyPI project (image mask
filling) and installs that instead (issue 21.2).
"""

from __future__ import annotations

import importlib.metadata
import shlex
import sys

# pyproject.toml's extras, for a source tree run without installing (tests check they agree).
EXTRAS = {
    "serve": ["aiohttp>=3.9", "prometheus-client>=0.20"],
    "bench": ["transformers>=4.45"],
    "gpu": ["xformers>=0.0.30"],
}


def requirements(extra: str) -> list[str]:
    """The requirement strings of `extra`, from the installed metadata when there is some."""
    try:
        declared = importlib.metadata.requires("maskfill") or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    found = []
    for line in declared:
        spec, _, marker = line.partition(";")
        if marker.replace("'", '"').replace(" ", "") == f'extra=="{extra}"':
            found.append(spec.strip())
    return found or list(EXTRAS[extra])


def install_hint(extra: str) -> str:
    """`<this python> -m pip install <packages>`: the environment that lacks them gets them."""
    packages = " ".join(shlex.quote(r) for r in requirements(extra))
    return f"{shlex.quote(sys.executable)} -m pip install {packages}"
