"""The quantized matmuls' contracts that a CPU can check (the kernels run on the CPU twins)."""

from __future__ import annotations

import pytest
import torch

from engine.model import qkernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_adds_its_bias_after_scaled_mm(monkeypatch, dtype):
    """cuBLASLt may refuse a bias epilogue with row-wise scales (issue 19): the bias must never
    reach `_scaled_mm`, and the result must still hold it."""
    calls = []
    real = torch._scaled_mm

    def recording(*args, **kwargs):
        calls.append(kwargs.get("bias", args[4] if len(args) > 4 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    torch.manual_seed(0)
    weight = torch.randn(48, 128, dtype=dtype)
    bias = torch.randn(48, dtype=dtype) * 4  # large enough that a lost bias shows
    weight_f8, scale = qkernels.quantize_fp8_rows(weight)

    def kernel(x):
        return qkernels.fp8_linear(x, weight_f8, scale, bias)

    assert qkernels.check(kernel, weight, 128, dtype, bias=bias) is None
    x = torch.randn(3, 5, 128, dtype=dtype)
    out = kernel(x)
    assert out.shape == (3, 5, 48) and out.dtype == dtype
    without = qkernels.fp8_linear(x, weight_f8, scale, None)
    # the same product plus the bias, up to the output dtype's rounding of both
    assert torch.allclose(out.float(), without.float() + bias.float(), rtol=0.02, atol=0.05)
    assert calls and all(b is None for b in calls)
