"""Quantized matmuls from plain ATen ops, so no Triton or compiler is needed at run time.

A denoising pass reads every weight once for a few dozen query rows: it is memory-bound, so
weights stored in 8 or 4 bits are only faster if the matmul reads them in that width
(design/engine.md §2.5). Dequantize-then-matmul reads them twice and loses (§6).

- int8 (W8A8, dynamic): each activation row gets its own scale, `torch._int_mm` multiplies
  int8 by int8 into int32, and the two scales are applied after.
- fp8 (W8A8, e4m3, Ada/Hopper): the same with `torch._scaled_mm`, whose epilogue applies the
  row-wise scales; the bias is added after it (a bias epilogue with row-wise scales may be
  refused by cuBLASLt, which would leave fp8 on the slow path for nothing).
- int4 (W4A16, bf16 activations): `torch._weight_int4pack_mm`, tinygemm's layout; a group of
  64/128 weights shares a scale and a zero point.

`check` runs a kernel once against a plain matmul of the dequantized weight: kernels that fail or
disagree (a layout mismatch, an unsupported GPU) are reported, and the caller keeps the slow but
exact path instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

INT8_MAX = 127.0
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
INT_MM_MIN_ROWS = 17  # cuBLASLt's int8 path needs more than 16 rows
SCALED_MM_ALIGN = 16  # fp8 GEMMs want every dimension a multiple of 16
TINYGEMM_INNER_K_TILES = 8  # K must then be a multiple of 8 * 16
AGREEMENT = 0.995  # cosine between a kernel and the dequantized reference


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return x if x.shape[0] >= rows else F.pad(x, (0, 0, 0, rows - x.shape[0]))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_absmax(x: Tensor) -> Tensor:
    """(M, K) -> (M, 1) float32 max |x| per row, never 0 (an all-zero row keeps scale 1)."""
    absmax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    return absmax.clamp_min_(1e-12)


def int8_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., K) -> (..., N): int8 weights (N, K) with a float32 scale per output row."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    x_scale = _row_absmax(x2).div_(INT8_MAX)  # (M, 1)
    xq = torch.round(x2 / x_scale).to(torch.int8)  # |x / scale| <= 127 by construction
    acc = torch._int_mm(_pad_rows(xq, INT_MM_MIN_ROWS), weight_q.t())[:rows]  # (M, N) int32
    out = torch.mul(acc, x_scale).mul_(weight_scale).to(x.dtype)
    if bias is not None:
        out = out.add_(bias)
    return out.view(*lead, -1)


def fp8_linear(x: Tensor, weight_f8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., K) -> (..., N): e4m3 weights (N, K) with a float32 scale per output row."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    x_scale = _row_absmax(x2).div_(FP8_MAX)  # (M, 1)
    xq = _pad_rows((x2 / x_scale).to(FP8), _round_up(rows, SCALED_MM_ALIGN))
    x_scale = _pad_rows(x_scale, xq.shape[0])
    # A 16-bit output: the CUTLASS row-wise kernel (sm89, or cuBLAS before 12.9) writes only
    # that; a float32 model gets bf16, then its dtype.
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = torch._scaled_mm(xq, weight_f8.t(), scale_a=x_scale, scale_b=weight_scale[None, :],
                           out_dtype=out_dtype)
    out = out[:rows].to(x.dtype)
    if bias is not None:
        out = out.add_(bias)
    return out.view(*lead, -1)


def quantize_fp8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) -> (e4m3 (N, K), float32 scale (N,)) with each row's max at the e4m3 maximum."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return (w / scale[:, None]).to(FP8), scale


def tinygemm_pack(q: Tensor, scale: Tensor, offset: Tensor,
                  even_high: bool = True) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 groups (q (N, K) values 0..15, w = q * scale + offset per group) ->
    tinygemm's packed weight and its (K / group, N, 2) bf16 scales-and-zeros. tinygemm computes
    w = (q - 8) * scale + zero, hence zero = offset + 8 * scale. On CUDA the input packs two
    nibbles a byte, the even column in the high nibble (`even_high=False` swaps them: the
    caller's check decides if a torch release disagrees)."""
    zeros = offset.float() + 8 * scale.float()
    scales_zeros = torch.stack((scale.float(), zeros), dim=-1).transpose(0, 1).contiguous()
    q32 = q.to(torch.int32)
    if q.is_cuda:
        high, low = (q32[:, 0::2], q32[:, 1::2]) if even_high else (q32[:, 1::2], q32[:, 0::2])
        packed = ((high << 4) | low).to(torch.uint8)
        return torch._convert_weight_to_int4pack(packed, TINYGEMM_INNER_K_TILES), \
            scales_zeros.to(torch.bfloat16)
    return torch._convert_weight_to_int4pack_for_cpu(q32, TINYGEMM_INNER_K_TILES), \
        scales_zeros.to(torch.bfloat16)


def int4_linear(x: Tensor, packed: Tensor, scales_zeros: Tensor, group_size: int,
                bias: Tensor | None) -> Tensor:
    """x (..., K) -> (..., N) through tinygemm (bf16 activations; other dtypes are cast)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    x16 = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
    mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
    out = mm(x16.contiguous(), packed, group_size, scales_zeros)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out.add_(bias)
    return out.view(*lead, -1)


def tinygemm_fits(in_features: int, out_features: int, group_size: int) -> bool:
    return in_features % (TINYGEMM_INNER_K_TILES * 16) == 0 and out_features % 8 == 0 and \
        in_features % group_size == 0


def check(kernel, reference_weight: Tensor, in_features: int, dtype: torch.dtype,
          bias: Tensor | None = None, rows: int = 33) -> str | None:
    """None when `kernel(x)` agrees with x @ reference_weight.T (+ bias), else why not."""
    x = torch.randn(rows, in_features, device=reference_weight.device, dtype=dtype)
    try:
        got = kernel(x).float()
        want = x.float() @ reference_weight.float().t()
        if bias is not None:
            want = want + bias.float()
        cosine = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    except (RuntimeError, NotImplementedError, TypeError) as error:
        return " ".join(str(error).split())[:200] or type(error).__name__
    if not cosine >= AGREEMENT:
        return f"output disagrees with the dequantized weight (cosine {cosine:.4f})"
    return None
