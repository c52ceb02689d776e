"""`maskfill-lsp --check`: what it finds on this machine (CPU torch, no CUDA), what it says about
a model that is missing or does not fit, and how it judges xformers builds and quant kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsp_server.client import server_command
from lsp_server.tools import doctor
from lsp_server.tools.doctor_kernels import (
    check_quant_kernel,
    check_xformers,
    xformers_call_finding,
)

# The installed console script (`python -m lsp_server` where none is installed, as on a lent GPU
# machine that runs the source tree).
SERVER = server_command()
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this checks a CPU machine")


def check(*args: str, quiet: bool = True) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [*SERVER, "--check", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    if quiet:  # everything is in the report, nothing leaks around it
        assert proc.stderr == "", proc.stderr
    return proc.returncode, proc.stdout.splitlines()


def line(lines: list[str], topic: str) -> str:
    found = [ln for ln in lines if ln[6:].startswith(f"{topic} ")]
    assert len(found) == 1, lines
    return found[0]


@needs_no_cuda
def test_on_a_cpu_machine_it_says_there_is_no_cuda_and_is_ready():
    code, lines = check()
    assert code == 0, lines
    assert line(lines, "torch").startswith(f"ok    torch     {torch.__version__}: ")
    if torch.version.cuda is None:
        assert "CPU-only build" in line(lines, "torch")
    cuda = line(lines, "cuda")
    assert cuda.startswith("info  cuda      not available: "), cuda
    assert "not needed for device cpu" in cuda
    assert line(lines, "xformers").startswith(("info ", "warn ", "ok "))  # never fatal on cpu
    model = line(lines, "model")
    assert model.startswith("ok    model     embedded model"), model
    assert "M parameters" in model
    assert line(lines, "memory").startswith("ok    memory    about ")
    # The quant line and the memory line name the same width (issue 21.6: "16-bit weights"
    # above "float32"): the embedded model is published bfloat16 and loads as float32 on a CPU.
    assert line(lines, "quant") == "info  quant     none: unquantized float32 weights", lines
    assert "(float32, quant none)" in line(lines, "memory")
    assert lines[-1] == "ok    ready: maskfill-lsp can serve completions on cpu"


@needs_no_cuda
def test_device_cuda_without_cuda_fails_and_says_why():
    code, lines = check("--device", "cuda")
    assert code == 1
    cuda = line(lines, "cuda")
    assert cuda.startswith("FAIL  cuda      not available: "), cuda
    if torch.version.cuda is None:
        assert "CPU-only build" in cuda and "install a CUDA build of torch" in cuda
    assert lines[-1].startswith("FAIL  1 problem(s) above"), lines


def test_a_missing_model_fails_with_the_download_command():
    code, lines = check("--model", "example-org/not-downloaded")
    assert code == 1
    model = line(lines, "model")
    assert model.startswith("FAIL  model     example-org/not-downloaded: ")
    assert "hf download example-org/not-downloaded" in model
    assert not any(ln[6:].startswith("memory") for ln in lines)


def test_a_checkpoint_folder_is_read_and_its_memory_estimated(memorized_model: Path):
    findings = doctor.run_checks(str(memorized_model), "cpu", "none")
    by_topic = {f.topic: f for f in findings}
    assert by_topic["model"].status == "ok"
    assert by_topic["model"].text.startswith(f"{memorized_model}: dream, ")
    assert by_topic["memory"].status == "ok"
    assert by_topic["memory"].text.endswith("free on cpu")


def test_a_broken_checkpoint_fails(tmp_path: Path, memorized_model: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in memorized_model.iterdir():
        data = file.read_bytes()
        (broken / file.name).write_bytes(data[:100] if file.suffix == ".safetensors" else data)
    (model,) = [f for f in doctor.run_checks(str(broken), "cpu", "none") if f.topic == "model"]
    assert model.status == "fail"
    assert "truncated or corrupt safetensors" in model.text


def test_memory_that_does_not_fit_fails_and_tight_memory_warns(monkeypatch, memorized_model):
    from engine.model import weights

    (memory,) = [
        f for f in doctor.run_checks(str(memorized_model), "cpu", "none") if f.topic == "memory"
    ]
    assert "(float32, quant none)" in memory.text  # as published
    needed = weights.estimate_bytes(
        weights.checkpoint_tensors(memorized_model), torch.float32, "none"
    )

    def memory_with(free: int):
        monkeypatch.setattr(weights, "available_memory", lambda device: free)
        (found,) = [
            f for f in doctor.run_checks(str(memorized_model), "cpu", "none") if f.topic == "memory"
        ]
        return found

    memory = memory_with(needed // 4)
    assert memory.status == "fail"
    assert "does not fit" in memory.text and "quant int8 or int4" in memory.text
    memory = memory_with(int(needed * 1.1))
    assert memory.status == "warn" and "tight" in memory.text, memory


def test_a_quantized_load_is_checked_before_and_after_quantizing(memorized_model: Path):
    memory = [
        f for f in doctor.run_checks(str(memorized_model), "cpu", "int8") if f.topic == "memory"
    ]
    assert [f.status for f in memory] == ["ok", "ok"]
    assert "before quantizing" in memory[0].text
    assert "quant int8" in memory[1].text


def test_devices_the_engine_cannot_use_fail():
    findings = doctor.run_checks(None, "mps", "none")
    (device,) = [f for f in findings if f.topic == "device"]
    assert device.status == "fail" and "cpu or cuda only" in device.text
    memory = [f for f in findings if f.topic == "memory"]
    assert [(f.status, f.text) for f in memory] == [("info", "not checked: mps is not usable here")]


def test_fp8_on_cpu_fails():
    findings = doctor.run_checks(None, "cpu", "fp8")
    assert any(f.topic == "quant" and f.status == "fail" and "CUDA GPU" in f.text for f in findings)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch):
    """Write an importable package under tmp_path; sys.modules is restored afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)

    def write(name: str, files: dict[str, str]) -> None:
        package = tmp_path / name
        package.mkdir()
        for module, source in files.items():
            (package / f"{module}.py").write_text(source, encoding="utf-8")

    yield write
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "xformers":
            del sys.modules[name]


def test_an_xformers_that_does_not_import_is_a_warning(fake_package):
    fake_package(
        "xformers",
        {
            "__init__": "__version__ = '0.0.35'\n",
            "ops": "raise OSError('libcudart.so.13: cannot open shared object file')\n",
        },
    )
    finding = check_xformers(cuda_device=None, needed_on=None)
    assert finding.status == "warn"
    assert "0.0.35 is installed but does not import" in finding.text
    assert "libcudart.so.13" in finding.text and "pip uninstall xformers" in finding.text


def test_an_xformers_without_a_gpu_is_not_called(fake_package):
    fake_package("xformers", {"__init__": "__version__ = '0.0.35'\n", "ops": ""})
    finding = check_xformers(cuda_device=None, needed_on=None)
    assert finding.status == "info"
    assert finding.text == "0.0.35 imports; its kernels need CUDA, none here"


MISMATCHED_XFORMERS_OPS = """
import logging, warnings
logging.getLogger("xformers").warning(
    "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions. xFormers was built for "
    "PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130)"
)
warnings.warn("A matching Triton is not available")

def memory_efficient_attention(*args, **kwargs):
    raise NotImplementedError("No operator found")
"""


def test_what_a_mismatched_xformers_logs_is_quoted_not_printed(fake_package, capfd):
    fake_package(
        "xformers", {"__init__": "__version__ = '0.0.35'\n", "ops": MISMATCHED_XFORMERS_OPS}
    )
    # A "GPU" this machine lacks: the call fails before any kernel, as a broken build would.
    finding = check_xformers(cuda_device="cuda:0", needed_on="cuda:0")
    assert finding.status in ("warn", "fail")
    assert "(it said: WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions." in finding.text
    assert capfd.readouterr() == ("", "")


def test_xformers_calls_are_judged_by_what_the_engine_would_do():
    def no_kernel() -> float:
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    def crash() -> float:
        raise RuntimeError("CUDA error: no kernel image is available for execution")

    warn = xformers_call_finding("0.0.35", no_kernel, needed_on="cuda:0")
    assert warn.status == "warn" and "fall back to SDPA" in warn.text
    assert xformers_call_finding("0.0.35", crash, needed_on="cuda:0").status == "fail"
    assert xformers_call_finding("0.0.35", crash, needed_on=None).status == "warn"
    assert (
        xformers_call_finding("0.0.35", lambda: float("nan"), needed_on="cuda:0").status == "fail"
    )
    ok = xformers_call_finding("0.0.35", lambda: 1e-3, needed_on="cuda:0")
    assert ok.status == "ok" and "real attention call runs" in ok.text


def test_quant_kernels_are_judged_where_they_run():
    assert check_quant_kernel("none", None).status == "info"
    on_cpu = check_quant_kernel("int8", None)
    assert on_cpu.status == "info" and "dequantizes" in on_cpu.text


def test_version():
    proc = subprocess.run([*SERVER, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"maskfill-lsp {doctor.maskfill_version()}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_device_and_kernels_are_checked():
    code, lines = check("--device", "cuda", quiet=False)  # a GPU library may print on its own
    cuda = line(lines, "cuda")
    assert cuda.startswith("ok    cuda      cuda:0 "), lines
    assert not line(lines, "xformers").startswith("FAIL"), lines
    assert line(lines, "memory").endswith("free on cuda"), lines
    assert code == 0, lines


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["int8", "int4", "fp8"])
def test_on_a_gpu_each_quant_mode_runs_its_fast_kernel(quant):
    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs an sm89+ GPU")
    finding = check_quant_kernel(quant, "cuda:0")
    assert finding.status == "ok", finding.text
