"""The GPU kernels `maskfill-lsp --check` looks at: xformers and the quantized matmuls.

Importing is not enough: the PyPI xformers wheel is built for one torch; under another it imports
and then fails every call. So xformers gets a tiny real attention call when a GPU is there, and a
quant mode gets one layer run through its fast kernel (engine/model/qkernels.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from engine.api import one_line
from lsp_server.findings import Finding

XFORMERS_ROLE = "optional: faster attention on CUDA; PyTorch SDPA is used without it"
MAX_ATTENTION_DIFF = 2e-2  # fp16 kernels vs the SDPA reference on a tiny random input


def installed_version(name: str) -> str | None:
    """The distribution's version, the module's __version__, or None when it is absent."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # importable without install metadata
        module = importlib.import_module(name)
        return str(getattr(module, "__version__", "unknown version"))


class _Collect(logging.Handler):
    def __init__(self, said: list[str]):
        super().__init__(logging.WARNING)
        self.said = said

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())


@contextlib.contextmanager
def quiet(package: str, said: list[str]) -> Iterator[None]:
    """Keep a package's warnings and log lines (a mismatched build's usual way to say why) out
    of the report's stdout and stderr; they are appended to `said`, to quote in a finding."""
    logger = logging.getLogger(package)
    handler, propagate = _Collect(said), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                said.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def quoted(said: list[str]) -> str:
    """The " (it said: ...)" suffix from the first thing a package logged, or ""."""
    first = next((" ".join(s.split()) for s in said if s.strip()), "")
    return f" (it said: {first[:200]})" if first else ""


def check_xformers(cuda_device: str | None, needed_on: str | None) -> Finding:
    """`cuda_device`: where to try a real call (None: no GPU here). `needed_on`: the device the
    server will run on when that is CUDA (a failure other than "no kernel" would break it)."""
    version = installed_version("xformers")
    if version is None:
        return Finding("info", "xformers", f"not installed ({XFORMERS_ROLE})")
    said: list[str] = []
    with quiet("xformers", said):
        try:
            xops = importlib.import_module("xformers.ops")
        except Exception as exc:  # ImportError, OSError from its CUDA libraries, ...
            xops, error = None, exc
    if xops is None:
        return Finding(
            "warn",
            "xformers",
            f"{version} is installed but does not import ({one_line(error, with_type=True)}); "
            "the engine uses "
            "PyTorch SDPA instead: `pip uninstall xformers`, or install the build made for "
            "this torch",
        )
    if cuda_device is None:
        return Finding("info", "xformers", f"{version} imports; its kernels need CUDA, none here")

    def call() -> float:
        with quiet("xformers", said):
            return tiny_attention_diff(xops, cuda_device)

    finding = xformers_call_finding(version, call, needed_on)
    if finding.status == "ok":
        return finding
    return Finding(finding.status, finding.topic, finding.text + quoted(said))


def tiny_attention_diff(xops: Any, device: str) -> float:
    """One grouped-query call through the engine's xformers path, with no fallback; returns
    the largest difference from PyTorch SDPA on the same input."""
    import torch

    from engine.model.sdpa import sdpa_attend
    from engine.model.xformers_attention import memory_efficient_attend

    generator = torch.Generator(device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.float16, generator=generator)

    q, k, v = rand(1, 4, 8, 64), rand(1, 2, 8, 64), rand(1, 2, 8, 64)
    key_mask = torch.ones(1, 8, dtype=torch.bool, device=device)
    key_mask[0, -2:] = False  # exercise the padding bias too
    got = memory_efficient_attend(xops, q, k, v, key_mask)
    want = sdpa_attend(q, k, v, key_mask)
    return float((got.float() - want.float()).abs().max())


def xformers_call_finding(
    version: str, call: Callable[[], float], needed_on: str | None
) -> Finding:
    """Classify one real call: works, has no kernel here (the engine falls back to SDPA after a
    failed dispatch on every call), or fails outright (the engine would fail with it)."""
    try:
        diff = call()
    except NotImplementedError as exc:
        return Finding(
            "warn",
            "xformers",
            f"{version} imports but has no kernel for this torch and GPU "
            f"({one_line(exc, with_type=True)[:200]}); "
            "every attention call would try it and fall back to SDPA: `pip uninstall xformers`, "
            "or install the build made for this torch",
        )
    except Exception as exc:  # a kernel that loads but crashes
        status = "fail" if needed_on else "warn"
        return Finding(
            status,
            "xformers",
            f"{version} fails a real attention call ({one_line(exc, with_type=True)[:200]}): "
            "`pip uninstall xformers` (the engine then uses PyTorch SDPA)",
        )
    if not diff <= MAX_ATTENTION_DIFF:  # also catches NaN
        return Finding(
            "fail" if needed_on else "warn",
            "xformers",
            f"{version} runs but its attention differs from SDPA by {diff:.3g}: "
            "`pip uninstall xformers`",
        )
    return Finding("ok", "xformers", f"{version}: a real attention call runs and matches SDPA")


def check_quant_kernel(quant: str, needed_on: str | None) -> Finding:
    """Whether the quant mode's fast CUDA matmul runs here (int8 _int_mm, int4 tinygemm, fp8
    _scaled_mm). Without it the layers still work, dequantizing: slower than 16-bit weights."""
    if quant == "none":  # (run_checks names the dtype once it has read the model)
        return Finding("info", "quant", "none: unquantized weights")
    if needed_on is None:
        return Finding("info", "quant", f"{quant} on the CPU dequantizes each layer (saves memory, "
                       "not time); the fast kernels are CUDA's")
    from engine.model.quantize import probe_fast_kernel

    try:
        kernel, reason = probe_fast_kernel(quant, needed_on)
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        return Finding("fail", "quant", f"{quant} layers do not run on {needed_on}: "
                       f"{one_line(exc, with_type=True)[:200]}")
    if reason is not None:
        return Finding("warn", "quant", f"{quant}: the fast kernel does not run here ({reason}); "
                       "layers dequantize instead, slower than quant none")
    return Finding("ok", "quant", f"{quant}: {kernel} runs and matches the dequantized weights")
