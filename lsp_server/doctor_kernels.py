"""The optional GPU libraries `maskfill-lsp --check` looks at: xformers and torchao.

Importing is not enough: the PyPI xformers wheel is built for one torch; under another it imports
and then fails every call. So xformers gets a tiny real attention call when a GPU is there.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

from lsp_server.findings import Finding

XFORMERS_ROLE = "optional: faster attention on CUDA; PyTorch SDPA is used without it"
TORCHAO_ROLE = "optional: only quant fp8 uses it"
MAX_ATTENTION_DIFF = 2e-2  # fp16 kernels vs the SDPA reference on a tiny random input


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def installed_version(name: str) -> str | None:
    """The distribution's version, the module's __version__, or None when it is absent."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # importable without install metadata
        module = importlib.import_module(name)
        return str(getattr(module, "__version__", "unknown version"))


def _import_quietly(module: str) -> Any:
    """Import, keeping a failing build's warnings (its usual way to say why) out of the report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def check_xformers(cuda_device: str | None, needed_on: str | None) -> Finding:
    """`cuda_device`: where to try a real call (None: no GPU here). `needed_on`: the device the
    server will run on when that is CUDA (a failure other than "no kernel" would break it)."""
    version = installed_version("xformers")
    if version is None:
        return Finding("info", "xformers", f"not installed ({XFORMERS_ROLE})")
    try:
        xops = _import_quietly("xformers.ops")
    except Exception as exc:  # ImportError, OSError from its CUDA libraries, ...
        return Finding(
            "warn",
            "xformers",
            f"{version} is installed but does not import ({one_line(exc)}); the engine uses "
            "PyTorch SDPA instead: `pip uninstall xformers`, or install the build made for "
            "this torch",
        )
    if cuda_device is None:
        return Finding("info", "xformers", f"{version} imports; its kernels need CUDA, none here")
    return xformers_call_finding(version, lambda: tiny_attention_diff(xops, cuda_device), needed_on)


def tiny_attention_diff(xops: Any, device: str) -> float:
    """One grouped-query call through the engine's xformers path, with no fallback; returns
    the largest difference from PyTorch SDPA on the same input."""
    import torch

    from engine.attention import sdpa_attend
    from engine.xformers_attention import memory_efficient_attend

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
            f"{version} imports but has no kernel for this torch and GPU ({one_line(exc)[:200]}); "
            "every attention call would try it and fall back to SDPA: `pip uninstall xformers`, "
            "or install the build made for this torch",
        )
    except Exception as exc:  # a kernel that loads but crashes
        status = "fail" if needed_on else "warn"
        return Finding(
            status,
            "xformers",
            f"{version} fails a real attention call ({one_line(exc)[:200]}): "
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


def check_torchao(quant: str) -> Finding:
    needed = quant == "fp8"
    version = installed_version("torchao")
    if version is None:
        if needed:
            return Finding(
                "fail", "torchao", "not installed; quant fp8 needs it: `pip install torchao`"
            )
        return Finding("info", "torchao", f"not installed ({TORCHAO_ROLE})")
    try:
        # The names engine/quantize.py imports for fp8.
        quantization = _import_quietly("torchao.quantization")
        for name in ("Float8DynamicActivationFloat8WeightConfig", "PerRow", "quantize_"):
            getattr(quantization, name)
    except Exception as exc:  # ImportError, AttributeError, or a build for another torch
        return Finding(
            "fail" if needed else "warn",
            "torchao",
            f"{version} is installed but unusable ({one_line(exc)[:200]}); install the torchao "
            "release made for this torch" + ("" if needed else " (only quant fp8 needs it)"),
        )
    return Finding("ok", "torchao", f"{version}: imports (quant fp8 can use it)")
