"""CUDA-only checks: xformers vs SDPA, quantized layers on the GPU, fp8, CPU/GPU agreement.

Every `gpu` test skips cleanly on a machine without CUDA (and the xformers/fp8 ones without
their optional packages or hardware); none of them is allowed to error there. The last tests
run everywhere: they check the xformers layout code against a CPU emulation of the kernel's
documented semantics, and the fallback a CPU (or xformers-less) machine takes.
"""

from __future__ import annotations

import copy
import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.model import xformers_attention
from engine.model.attention import xformers_probe
from engine.model.quantize import Int4Linear, Int8Linear, quantize_model, weight_bytes
from engine.model.sdpa import sdpa_attend
from tests.engine.test_quantize import logits_of, tiny_model


def requires_cuda(test):
    return pytest.mark.gpu(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def padding_mask(lengths: list[int], total: int, device: str) -> torch.Tensor:
    valid = torch.tensor(lengths, device=device)  # (B,)
    return torch.arange(total, device=device)[None, :] < valid[:, None]  # (B, total)


# --- xformers ------------------------------------------------------------------------------------


@pytest.fixture
def xformers_attend():
    """The xformers kernel with no SDPA fallback, so a passing test proves xformers ran. A
    wheel whose kernels do not run on this torch/GPU skips with the probe's reason."""
    xops = pytest.importorskip("xformers.ops", reason="xformers is not installed")
    usable, reason = xformers_probe()
    if not usable:
        pytest.skip(f"xformers unusable here: {reason}")
    assert xformers_attention.available()
    return functools.partial(xformers_attention.memory_efficient_attend, xops)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (14, 2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("q_len,k_len", [(37, 37), (16, 83)])  # encode-like and step-like shapes
def test_xformers_matches_sdpa(xformers_attend, dtype, q_heads, kv_heads, masked, q_len, k_len):
    torch.manual_seed(0)
    batch, head_dim = 3, 64
    q = torch.randn(batch, q_heads, q_len, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, k_len, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, k_len, head_dim, device="cuda", dtype=dtype)
    # Ragged valid lengths (one row unpadded) exercise the padding bias per batch row.
    key_mask = padding_mask([k_len, k_len - 5, 11], k_len, "cuda") if masked else None
    expected = sdpa_attend(q, k, v, key_mask)
    got = xformers_attend(q, k, v, key_mask)
    assert got.shape == expected.shape == (batch, q_heads, q_len, head_dim)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@requires_cuda
def test_masked_keys_do_not_influence_xformers_output(xformers_attend):
    torch.manual_seed(1)
    q = torch.randn(2, 8, 10, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    key_mask = padding_mask([30, 25], 40, "cuda")
    scrambled_k, scrambled_v = k.clone(), v.clone()
    scrambled_k[:, :, 30:] = 100.0
    scrambled_v[:, :, 30:] = -100.0
    torch.testing.assert_close(
        xformers_attend(q, k, v, key_mask), xformers_attend(q, scrambled_k, scrambled_v, key_mask)
    )


# --- quantized layers on CUDA --------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("make", [Int8Linear.from_linear, Int4Linear.from_linear])
def test_quantized_linear_on_cuda_matches_cpu(make):
    torch.manual_seed(2)
    quantized = make(nn.Linear(256, 96))
    x = torch.randn(4, 256)
    with torch.no_grad():
        on_cpu = quantized(x)
        on_gpu = copy.deepcopy(quantized).to("cuda")(x.to("cuda"))
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@requires_cuda
@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_model_forward_on_cuda_matches_cpu(mode):
    # fp32 on both devices so the comparison measures the device path, not dtype rounding;
    # on CUDA this goes through engine.model.attention's xformers branch when xformers is installed.
    model = quantize_model(tiny_model(seed=3), mode)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(4))
    on_cpu = logits_of(model, ids)
    on_gpu = logits_of(copy.deepcopy(model).to("cuda"), ids.to("cuda"))
    assert_same_logits(on_gpu, on_cpu)


def assert_same_logits(on_gpu: torch.Tensor, on_cpu: torch.Tensor) -> None:
    """fp32 on both sides: only kernel summation order differs."""
    assert on_gpu.is_cuda
    scale = on_cpu.abs().max().item()
    assert (on_gpu.cpu() - on_cpu).abs().max().item() <= 1e-3 * scale
    assert cosine(on_gpu.cpu(), on_cpu) > 0.9999


@requires_cuda
@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("variant", ["dream", "open-dcoder"])
def test_tiny_checkpoint_loads_and_runs_on_cuda_like_on_cpu(tmp_path, variant, mode):
    from engine.model.weights import load_model
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    path = str(make_tiny_checkpoint(tmp_path / variant, variant))
    on_cpu = load_model(path, "cpu", torch.float32, mode)
    on_gpu = load_model(path, "cuda", torch.float32, mode)
    assert all(t.is_cuda for t in on_gpu.model.state_dict().values())
    ids = torch.randint(
        0, on_cpu.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(10)
    )
    assert_same_logits(logits_of(on_gpu.model, ids.cuda()), logits_of(on_cpu.model, ids))


@requires_cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_quantized_model_on_cuda_stays_close(mode):
    model = tiny_model(seed=5).to(torch.bfloat16)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(6)).cuda()
    reference = logits_of(copy.deepcopy(model).cuda(), ids)
    quantized = quantize_model(model, mode).cuda()
    assert cosine(logits_of(quantized, ids), reference) >= (0.99 if mode == "int8" else 0.95)


# --- fp8 (torch._scaled_mm, sm89+) ----------------------------------------------------------------


def requires_fp8(test):
    return requires_cuda(pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
        reason="fp8 needs an sm89+ GPU")(test))


@requires_fp8
def test_fp8_model_on_sm89_stays_close():
    from engine.model.quantize import use_fast_kernels

    model = tiny_model(seed=7).to(torch.bfloat16)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(8)).cuda()
    reference_model = copy.deepcopy(model).cuda()
    reference = logits_of(reference_model, ids)
    quantized = quantize_model(model, "fp8", device="cuda").cuda()
    assert use_fast_kernels(quantized) == {"Fp8Linear": "scaled_mm"}
    assert cosine(logits_of(quantized, ids), reference) >= 0.99
    assert weight_bytes(quantized) < weight_bytes(reference_model)


@requires_fp8
def test_fp8_through_the_loader_on_sm89(tmp_path):
    from engine.model.weights import load_model
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    path = str(make_tiny_checkpoint(tmp_path / "dream", "dream"))
    full = load_model(path, "cuda", torch.bfloat16, "none")
    fp8 = load_model(path, "cuda", torch.bfloat16, "fp8")
    assert fp8.kernels == {"Fp8Linear": "scaled_mm"}
    ids = torch.randint(
        0, full.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(11)
    ).cuda()
    assert cosine(logits_of(fp8.model, ids), logits_of(full.model, ids)) >= 0.98
    assert weight_bytes(fp8.model) < weight_bytes(full.model)


# --- everywhere: layout against an emulated kernel, and the fallback -----------------------------


def emulated_memory_efficient_attention(q, k, v, attn_bias=None):
    """xformers' documented 5-D semantics, in plain torch: q (B, Mq, G, H, K), k/v (B, Mk, G, H,
    K), additive bias (B, G, H, Mq, Mk), softmax scale 1/sqrt(K). Checks the bias alignment rule
    (strides of all but the last dim a multiple of 8) that the real kernel enforces."""
    assert q.dim() == k.dim() == v.dim() == 5
    qs, ks, vs = (t.permute(0, 2, 3, 1, 4).float() for t in (q, k, v))  # (B, G, H, M, K)
    scores = qs @ ks.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, G, H, Mq, Mk)
    if attn_bias is not None:
        assert attn_bias.shape == scores.shape
        assert all(stride % 8 == 0 for stride in attn_bias.stride()[:-1])
        scores = scores + attn_bias
    return (scores.softmax(-1) @ vs).permute(0, 3, 1, 2, 4).to(q.dtype)  # (B, Mq, G, H, K)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (14, 2)])
@pytest.mark.parametrize("q_len,k_len", [(37, 37), (16, 83)])
@pytest.mark.parametrize("masked", [False, True])
def test_xformers_layout_matches_sdpa_on_an_emulated_kernel(
    q_heads, kv_heads, q_len, k_len, masked
):
    torch.manual_seed(9)
    xops = types.SimpleNamespace(memory_efficient_attention=emulated_memory_efficient_attention)
    q = torch.randn(3, q_heads, q_len, 64)
    k = torch.randn(3, kv_heads, k_len, 64)
    v = torch.randn(3, kv_heads, k_len, 64)
    key_mask = padding_mask([k_len, k_len - 5, 0], k_len, "cpu") if masked else None  # row 2: none
    got = xformers_attention.memory_efficient_attend(xops, q, k, v, key_mask)
    torch.testing.assert_close(got, sdpa_attend(q, k, v, key_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_xformers_is_unavailable_and_attend_falls_back_to_sdpa():
    assert not xformers_attention.available()
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    key_mask = padding_mask([6], 7, "cpu")
    assert torch.equal(
        xformers_attention.xformers_attend(q, k, v, key_mask), sdpa_attend(q, k, v, key_mask)
    )
