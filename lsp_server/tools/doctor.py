"""`maskfill-lsp --check`: can this install serve completions, and if not, why not.

One line per finding (torch build, CUDA, device, xformers, quant kernels, model, memory fit), then a
verdict. Exit status 1 when something the server needs is broken (a FAIL line), else 0. It reads
checkpoint headers only: no weights are loaded, so it takes seconds even for a 7B model.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings
from typing import Any

from engine.api import one_line
from lsp_server.findings import Finding
from lsp_server.settings import Settings
from lsp_server.tools.doctor_kernels import check_quant_kernel, check_xformers

INSTALL_HINT = "see the README's Install section"
TIGHT_MEMORY_SHARE = 0.8  # the context cache and activations need room beside the weights


def maskfill_version() -> str:
    try:
        return importlib.metadata.version("maskfill")
    except importlib.metadata.PackageNotFoundError:
        return "(source tree, not installed)"


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def check_torch() -> tuple[Finding, Any]:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken build failing in its own init
        why = one_line(exc, with_type=True)
        return Finding("fail", "torch", f"cannot import ({why}); {INSTALL_HINT}"), None
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build (its GPUs are device cuda)"
    else:
        build = "CPU-only build"
    return Finding("ok", "torch", f"{torch.__version__}: {build}"), torch


def check_cuda(torch: Any, device: str) -> Finding:
    wants_cuda = device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught:  # a driver problem arrives as a warning
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        count = torch.cuda.device_count()
        gpus = []
        for index in range(count):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
                f"{size(props.total_memory)})"
            )
        use = "" if wants_cuda else "; the server uses it with device cuda (--device cuda here)"
        return Finding("ok", "cuda", ", ".join(gpus) + use)
    if not torch.version.cuda:
        reason = f"this torch ({torch.__version__}) is a CPU-only build"
        fix = "; for an NVIDIA GPU install a CUDA build of torch first (README: Install)"
    else:
        reason = f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"
        if caught:
            reason += f": {str(caught[0].message).splitlines()[0]}"
        fix = "; check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
    if wants_cuda:
        return Finding("fail", "cuda", f"not available: {reason}{fix}, or use device cpu")
    return Finding("info", "cuda", f"not available: {reason} (not needed for device cpu)")


def check_device(torch: Any, device: str) -> tuple[Finding | None, Any]:
    """The torch.device the engine would load on, or a FAIL saying why it cannot."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        return Finding("fail", "device", f"{device!r} is not a device (use cpu or cuda)"), None
    if target.type not in ("cpu", "cuda"):
        return Finding("fail", "device", f"{device}: the engine runs on cpu or cuda only"), None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            return None, None  # the cuda line has said why
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            return Finding("fail", "device", f"{device}: only {count} CUDA device(s) here"), None
    return None, target


def check_quant(torch: Any, quant: str, target: Any) -> Finding | None:
    if quant != "fp8" or target is None:
        return None
    if target.type != "cuda":
        return Finding("fail", "quant", f"fp8 needs a CUDA GPU (sm_89+); the device is {target}")
    major, minor = torch.cuda.get_device_capability(target)
    if (major, minor) < (8, 9):
        return Finding(
            "fail", "quant", f"fp8 needs an Ada/Hopper GPU (sm_89+); this is sm_{major}{minor}"
        )
    return None


def check_model(spec: str | None) -> tuple[Finding, Any]:
    """Resolve and read the checkpoint's config, tokenizer and weight headers (no weights)."""
    from engine.api import EngineError
    from engine.model.config import ModelArgs
    from engine.model.embedded_model import default_model_path
    from engine.model.tokenizer import Tokenizer

    try:
        from engine.model import weights
    except Exception as exc:  # torch is missing or broken: the torch line says so
        why = one_line(exc, with_type=True)
        return Finding("fail", "model", f"cannot check without a working torch ({why})"), None
    if spec is None:
        embedded = default_model_path()
        if embedded is None:
            return Finding(
                "fail", "model", "no model set and this install has no embedded model"
            ), None
        label, spec = "embedded model (a demo, not a useful assistant: set model)", str(embedded)
    else:
        label = spec
    try:
        path = weights.resolve_checkpoint(spec)
        cfg = weights._with_tokenizer_mask_id(weights.read_config(path), path)
        args = ModelArgs.from_hf_config(cfg)
        Tokenizer.from_dir(path, args)
        tensors = weights.checkpoint_tensors(path)
    except EngineError as exc:
        return Finding("fail", "model", str(exc)), None
    params = sum(_numel(entry.shape) for entry in tensors.values())
    text = f"{label}: {args.variant}, {params / 1e6:.1f}M parameters, published {args.torch_dtype}"
    if label != spec:
        text += f" ({path})"
    return Finding("ok", "model", text), (args, tensors)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def load_dtype(loaded: Any, target: Any) -> str:
    """The dtype the loader would give these weights on `target` (float32 on a CPU, where it
    fits: faster there than the published 16-bit)."""
    from engine.model import weights

    args, tensors = loaded
    return str(weights._default_dtype(args, tensors, target)).removeprefix("torch.")


def check_memory(loaded: Any, target: Any, quant: str) -> list[Finding]:
    """Weights at the dtype and width the loader would use, against free memory
    (engine.model.weights)."""
    import torch

    from engine.model import weights

    args, tensors = loaded
    dtype = weights._default_dtype(args, tensors, target)
    dtype_name = str(dtype).removeprefix("torch.")
    steps = [
        (target, weights.estimate_bytes(tensors, dtype, quant), f"{dtype_name}, quant {quant}")
    ]
    if quant != "none":  # quantization runs on a CPU copy of the full-width weights first
        full = weights.estimate_bytes(tensors, dtype, "none")
        steps.insert(0, (torch.device("cpu"), full, f"{dtype_name} before quantizing"))
    return [
        memory_fit(needed, weights.available_memory(device), what, device)
        for device, needed, what in steps
    ]


def memory_fit(needed: int, free: int | None, what: str, device: Any) -> Finding:
    about = f"about {size(needed)} ({what})"
    if free is None:
        return Finding("warn", "memory", f"{about} on {device}; free memory unknown")
    if needed > free:
        fix = "try quant int8 or int4, a smaller model or another device"
        return Finding(
            "fail", "memory", f"{about} does not fit the {size(free)} free on {device}: {fix}"
        )
    if needed > TIGHT_MEMORY_SHARE * free:
        tight = "tight: the context cache needs room too"
        return Finding("warn", "memory", f"{about} of {size(free)} free on {device} ({tight})")
    return Finding("ok", "memory", f"{about} of {size(free)} free on {device}")


def run_checks(model: str | None, device: str, quant: str) -> list[Finding]:
    torch_finding, torch = check_torch()
    findings = [torch_finding]
    if torch is None:
        return findings
    findings.append(check_cuda(torch, device))
    device_problem, target = check_device(torch, device)
    cuda_here = "cuda:0" if torch.cuda.is_available() else None
    if target is not None and target.type == "cuda":
        cuda_here = str(target) if target.index is not None else "cuda:0"
    needed_on = str(target) if target is not None and target.type == "cuda" else None
    findings += [f for f in (device_problem, check_quant(torch, quant, target)) if f]
    findings.append(check_xformers(cuda_here, needed_on))
    kernel = len(findings)
    findings.append(check_quant_kernel(quant, needed_on))
    model_finding, loaded = check_model(model)
    findings.append(model_finding)
    if loaded is not None and target is not None:
        if quant == "none":  # the width the memory line counts, not a guess
            findings[kernel] = Finding(
                "info", "quant", f"none: unquantized {load_dtype(loaded, target)} weights")
        findings += check_memory(loaded, target, quant)
    elif loaded is not None:
        findings.append(Finding("info", "memory", f"not checked: {device} is not usable here"))
    return findings


def verdict(findings: list[Finding], device: str) -> str:
    failures = sum(f.status == "fail" for f in findings)
    if failures:
        return f"FAIL  {failures} problem(s) above stop maskfill-lsp from serving on {device}"
    return f"ok    ready: maskfill-lsp can serve completions on {device}"


def main(model: str | None = None, device: str | None = None, quant: str | None = None) -> int:
    defaults = Settings()
    device = device or defaults.device
    quant = quant or defaults.quant
    print(f"maskfill {maskfill_version()}, python {sys.version.split()[0]} ({sys.executable})")
    print(f"checking model {model or 'embedded'}, device {device}, quant {quant}", flush=True)
    findings = run_checks(model, device, quant)
    for finding in findings:
        print(finding.line())
    print(verdict(findings, device))
    return 1 if any(f.status == "fail" for f in findings) else 0
