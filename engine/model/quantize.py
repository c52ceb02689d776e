"""Quantization swapped in at load time: int8 per output channel, int4 per group, fp8 per row.

The modules keep only the packed integers and their scales resident. On the CPU (tests, CI)
int8 and int4 dequantize in the activation dtype, which saves memory but not time. On CUDA,
`use_fast_kernels` switches every layer to a matmul that reads the weights in their stored width
(engine/model/qkernels.py: int8 and fp8 W8A8, int4 tinygemm), each kernel first checked against the
dequantized weight; a kernel that fails the check leaves its layers on the exact slow path and
says why. Embeddings are quantized too (int8/int4), because on small models the vocabulary
table dominates the bytes; a head tied to the embedding reads the same quantized table.

fp8 (e4m3 weights and activations, Ada/Hopper) quantizes the body's linear layers only: the head
and the embeddings stay in 16 bits (design/engine.md §2.5).
"""

from __future__ import annotations

import logging
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import EngineError, QuantMode
from engine.model import qkernels

log = logging.getLogger(__name__)

QUANT_MODES = get_args(QuantMode)  # the typed boundary's list (engine/api.py)
INT4_GROUP_SIZES = (32, 64, 128)
_INT8_MAX = 127
_INT4_LEVELS = 15  # unsigned nibble 0..15


# ---------------------------------------------------------------------------------------------
# Tensor-level quantizers (pure functions, shared by the modules and the tests)
# ---------------------------------------------------------------------------------------------


# Quantize this many elements at a time: the fp32 temporaries of a whole 152k-row embedding
# would be several GB on top of the model being loaded.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(weight: torch.Tensor):
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return weight.detach().split(rows_per_chunk, dim=0)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: weight ≈ q * scale[:, None]. Returns (q int8 (R, C), scale (R,))."""
    parts = [_quantize_int8_chunk(chunk) for chunk in _row_chunks(weight)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def _quantize_int8_chunk(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    absmax = w.abs().amax(dim=1)  # (R,)
    # An all-zero row would give scale 0 and 0/0 below; any positive scale encodes it exactly.
    scale = torch.where(absmax > 0, absmax / _INT8_MAX, torch.ones_like(absmax))
    q = torch.clamp(torch.round(w / scale[:, None]), -_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale.to(weight.dtype)


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int = 64, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int4 per group of `group_size` columns, two nibbles per byte.

    Columns are zero-padded up to a multiple of the group size. Asymmetric groups store a scale
    and a float offset (the group minimum): w ≈ q * scale + offset with q in 0..15. Symmetric
    groups store only a scale: w ≈ (q - 8) * scale with q - 8 in -8..7.
    Returns (packed uint8 (R, Cp/2), scale (R, G), offset (R, G) or None).
    """
    _check_group_size(group_size)
    parts = [_quantize_int4_chunk(chunk, group_size, symmetric) for chunk in _row_chunks(weight)]
    packed = torch.cat([p for p, _, _ in parts])
    scale = torch.cat([s for _, s, _ in parts])
    offset = None if symmetric else torch.cat([o for _, _, o in parts])
    return packed, scale, offset


def _quantize_int4_chunk(
    weight: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    rows, cols = weight.shape
    padded_cols = -(-cols // group_size) * group_size
    w = weight.float()
    if padded_cols != cols:
        w = F.pad(w, (0, padded_cols - cols))
    groups = w.view(rows, padded_cols // group_size, group_size)  # (R, G, S)
    if symmetric:
        absmax = groups.abs().amax(dim=-1)  # (R, G)
        scale = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))
        q = torch.clamp(torch.round(groups / scale[..., None]), -8, 7) + 8
        offset = None
    else:
        low = groups.amin(dim=-1)
        high = groups.amax(dim=-1)
        span = high - low
        scale = torch.where(span > 0, span / _INT4_LEVELS, torch.ones_like(span))
        q = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, _INT4_LEVELS)
        offset = low.to(weight.dtype)
    q = q.to(torch.uint8).view(rows, padded_cols)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (R, Cp/2): even column in the low nibble
    return packed, scale.to(weight.dtype), offset


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., Cp/2) uint8 -> (..., Cp) uint8 nibbles 0..15, in column order."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_int4_groups(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of quantize_int4_groups on any leading shape: (..., Cp/2) -> (..., cols)."""
    q = unpack_int4(packed)  # (..., Cp)
    lead = q.shape[:-1]
    groups = scale.shape[-1]
    q = q.view(*lead, groups, -1).to(dtype)  # (..., G, S)
    if offset is None:
        w = (q - 8) * scale.to(dtype)[..., None]
    else:
        w = q * scale.to(dtype)[..., None] + offset.to(dtype)[..., None]
    return w.view(*lead, -1)[..., :cols]


def _check_group_size(group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise EngineError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _empty_like_linear(cls, linear: nn.Linear, *extra) -> nn.Module:
    """A quantized layer of `linear`'s shape on its device (no round trip through host memory),
    its bias copied; the caller fills in the quantized weight."""
    with torch.device(linear.weight.device):
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     linear.weight.dtype, *extra)
    if linear.bias is not None:
        module.bias.copy_(linear.bias.detach())
    return module


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (per output channel scale); math in the activation dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = _empty_like_linear(cls, linear)
        q, scale = quantize_int8_rows(linear.weight)
        module.weight_q.copy_(q)
        module.weight_scale.copy_(scale)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized (out, in) weight, built on demand for code that reads `.weight` directly
        (the model's head does); it costs one transient full-size copy, as forward does."""
        return dequantize_int8_rows(self.weight_q, self.weight_scale, self.weight_scale.dtype)

    kernel = "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int_mm":
            return qkernels.int8_linear(x, self.weight_q, self.scale32, self.bias)
        # Scale after the matmul: one multiply per output instead of per weight.
        out = F.linear(x, self.weight_q.to(x.dtype)) * self.weight_scale.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out

    def use_fast_kernel(self, verify: bool = True) -> str | None:
        """Switch to int8 x int8 matmuls (None), or say why they cannot be used here."""
        scale32 = self.weight_scale.float()
        reason = qkernels.check(
            lambda x: qkernels.int8_linear(x, self.weight_q, scale32, self.bias), self.weight,
            self.in_features, self.weight_scale.dtype, self.bias) if verify else None
        if reason is None:
            self.register_buffer("scale32", scale32, persistent=False)
            self.kernel = "int_mm"
        return reason

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """nn.Linear with int4 weights packed two per byte, one scale (and offset) per group."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        group_size: int = 64,
        symmetric: bool = False,
    ):
        super().__init__()
        _check_group_size(group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = symmetric
        padded = -(-in_features // group_size) * group_size
        groups = padded // group_size
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, padded // 2, dtype=torch.uint8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer(
            "weight_offset", None if symmetric else torch.zeros(out_features, groups, dtype=dtype)
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 64, symmetric: bool = False
    ) -> Int4Linear:
        module = _empty_like_linear(cls, linear, group_size, symmetric)
        packed, scale, offset = quantize_int4_groups(linear.weight, group_size, symmetric)
        module.weight_packed.copy_(packed)
        module.weight_scale.copy_(scale)
        if offset is not None:
            module.weight_offset.copy_(offset)
        return module

    kernel = "dequant"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.kernel == "tinygemm":  # the packed layout only multiplies: multiply by I
            eye = torch.eye(self.in_features, dtype=torch.bfloat16,
                            device=self.weight_tinygemm.device)
            return qkernels.int4_linear(eye, self.weight_tinygemm, self.scales_zeros,
                                        self.group_size, None).t().to(dtype)
        return dequantize_int4_groups(
            self.weight_packed, self.weight_scale, self.weight_offset, self.in_features, dtype
        )  # (out, in)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized (out, in) weight on demand (see Int8Linear.weight)."""
        return self.dequantized_weight(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype if self.kernel == "tinygemm" else self.weight_scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "tinygemm":
            return qkernels.int4_linear(x, self.weight_tinygemm, self.scales_zeros,
                                        self.group_size, self.bias)
        return F.linear(
            x,
            self.dequantized_weight(x.dtype),
            None if self.bias is None else self.bias.to(x.dtype),
        )

    def use_fast_kernel(self, verify: bool = True) -> str | None:
        """Repack for tinygemm (None), or say why not. The portable copy is then dropped."""
        if not qkernels.tinygemm_fits(self.in_features, self.out_features, self.group_size):
            return f"shape {self.out_features}x{self.in_features} does not fit tinygemm's tiles"
        offset = self.weight_offset if self.weight_offset is not None else -8 * self.weight_scale
        reference = self.dequantized_weight(torch.bfloat16) if verify else None
        reason = None
        for even_high in _nibble_orders():
            try:
                packed, scales_zeros = qkernels.tinygemm_pack(
                    unpack_int4(self.weight_packed), self.weight_scale, offset, even_high)
            except (RuntimeError, NotImplementedError) as error:
                return " ".join(str(error).split())[:200]
            reason = qkernels.check(
                lambda x, p=packed, sz=scales_zeros: qkernels.int4_linear(
                    x, p, sz, self.group_size, self.bias),
                reference, self.in_features, torch.bfloat16, self.bias) if verify else None
            if reason is None:
                _NIBBLE_ORDER[:] = [even_high]  # every later layer packs the same way
                break
        if reason is None:
            self.register_buffer("weight_tinygemm", packed)
            self.register_buffer("scales_zeros", scales_zeros)
            for name in ("weight_packed", "weight_scale", "weight_offset"):
                self.register_buffer(name, None)
            self.kernel = "tinygemm"
        return reason

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 group={self.group_size} {kind}"
        )


_NIBBLE_ORDER: list[bool] = []  # tinygemm's nibble order once a check has confirmed one


def _nibble_orders() -> list[bool]:
    return list(_NIBBLE_ORDER) or [True, False]


class Fp8Linear(nn.Module):
    """nn.Linear with e4m3 weights (a float32 scale per output row) and e4m3 activations
    (a scale per row, computed on the fly), multiplied by torch._scaled_mm."""

    kernel = "scaled_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_f8", torch.zeros(out_features, in_features,
                                                      dtype=qkernels.FP8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        module = _empty_like_linear(cls, linear)
        q, scale = qkernels.quantize_fp8_rows(linear.weight.detach())
        module.weight_f8.copy_(q)
        module.weight_scale.copy_(scale)
        return module

    @property
    def weight(self) -> torch.Tensor:
        dtype = torch.float32 if self.bias is None else self.bias.dtype
        return (self.weight_f8.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "scaled_mm":
            return qkernels.fp8_linear(x, self.weight_f8, self.weight_scale, self.bias)
        return F.linear(x, self.weight.to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def use_fast_kernel(self, verify: bool = True) -> str | None:
        reason = qkernels.check(
            lambda x: qkernels.fp8_linear(x, self.weight_f8, self.weight_scale, self.bias),
            self.weight, self.in_features, torch.bfloat16, self.bias) if verify else None
        if reason is not None:
            self.kernel = "dequant"
        return reason

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


class QuantizedEmbedding(nn.Module):
    """Embedding table stored as int8 rows or int4 groups; gathers rows, then dequantizes them.

    Output dtype is the scale dtype (the model's dtype), since an embedding has no activation
    input to take it from. `project(h)` uses the table as a tied output head.
    """

    def __init__(self, embedding: nn.Embedding, mode: str, group_size: int = 64):
        super().__init__()
        if mode not in ("int8", "int4"):
            raise EngineError(f"embedding quantization supports int8 or int4, got {mode!r}")
        self.mode = mode
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        weight = embedding.weight
        if mode == "int8":
            q, scale = quantize_int8_rows(weight)
            self.register_buffer("weight_q", q)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_offset", None)
        else:
            packed, scale, offset = quantize_int4_groups(weight, group_size, symmetric=False)
            self.register_buffer("weight_q", packed)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_offset", offset)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def _dequantize(
        self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        if self.mode == "int8":
            return q.to(dtype) * scale.to(dtype)[..., None]
        return dequantize_int4_groups(q, scale, offset, self.embedding_dim, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized (V, D) table on demand, for a head that reads the embedding's `.weight`.
        Transient: the resident copy stays quantized."""
        return self._dequantize(self.weight_q, self.weight_scale, self.weight_offset, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offset = None if self.weight_offset is None else self.weight_offset[ids]
        return self._dequantize(self.weight_q[ids], self.weight_scale[ids], offset, self.dtype)

    kernel = "dequant"

    def use_fast_kernel(self, verify: bool = True) -> str | None:
        """Tied head through int8 x int8 matmuls (int8 tables; None), or why not."""
        if self.mode != "int8":  # tinygemm would need a second copy of the table: keep one
            return None
        scale32 = self.weight_scale.float()
        reason = qkernels.check(
            lambda x: qkernels.int8_linear(x, self.weight_q, scale32, None), self.weight,
            self.embedding_dim, self.dtype) if verify else None
        if reason is None:
            self.register_buffer("scale32", scale32, persistent=False)
            self.kernel = "int_mm"
        return reason

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Tied head: h (..., D) -> logits (..., V) against the quantized table."""
        if self.kernel == "int_mm":
            return qkernels.int8_linear(h, self.weight_q, self.scale32, None)
        if self.mode == "int8":
            # Same trick as Int8Linear: the per-row scale is a per-logit scale.
            return F.linear(h, self.weight_q.to(h.dtype)) * self.weight_scale.to(h.dtype)
        table = self._dequantize(self.weight_q, self.weight_scale, self.weight_offset, h.dtype)
        return F.linear(h, table)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.mode}"


class TiedQuantizedHead(nn.Module):
    """Output head that reads a QuantizedEmbedding's table: the tied weights are stored once.

    The embedding is held outside the module registry (in a tuple) so state_dict, .to() and
    weight_bytes see the table only under the embedding's own name.
    """

    def __init__(self, embedding: QuantizedEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self._table = (embedding,)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._table[0].project(h)
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        return logits


# ---------------------------------------------------------------------------------------------
# Whole-model entry points
# ---------------------------------------------------------------------------------------------


def quantize_model(
    model: nn.Module,
    mode: str,
    group_size: int = 64,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Swap the model's Linear/Embedding layers for quantized ones, in place; returns the model.

    mode: "none" (no-op), "int8", "int4" (per group of `group_size` in 32/64/128), or "fp8"
    (CUDA sm89+ only). `device` is the device the caller will run on; it only matters for fp8,
    which refuses a non-CUDA target.
    """
    if mode not in QUANT_MODES:
        choices = ", ".join(QUANT_MODES)
        raise EngineError(f"unknown quantization mode {mode!r}; choose one of {choices}")
    if mode == "none":
        return model
    if mode == "fp8":
        return _quantize_fp8(model, device)
    if mode == "int4":
        _check_group_size(group_size)

    tied = _tied_pairs(model)  # id(Linear) -> Embedding sharing its weight
    quantized_embeddings: dict[int, QuantizedEmbedding] = {}
    for parent, name, child in list(_named_children_recursive(model)):
        if isinstance(child, nn.Embedding):
            quantized = QuantizedEmbedding(child, mode, group_size)
            quantized_embeddings[id(child)] = quantized
            setattr(parent, name, quantized)
    for parent, name, child in list(_named_children_recursive(model)):
        if not isinstance(child, nn.Linear):
            continue
        source = tied.get(id(child))
        if source is not None:
            new: nn.Module = TiedQuantizedHead(quantized_embeddings[id(source)], child.bias)
        elif mode == "int8":
            new = Int8Linear.from_linear(child)
        else:
            new = Int4Linear.from_linear(child, group_size)
        setattr(parent, name, new)
    return model


def probe_fast_kernel(mode: str, device: torch.device | str) -> tuple[str, str | None]:
    """(kernel, why not) of a small bf16 layer quantized in `mode` on `device`: what a model
    loaded there would run. For diagnostics (`maskfill-lsp --check`)."""
    linear = nn.Linear(256, 256, bias=True, device=device, dtype=torch.bfloat16)
    make = {"int8": Int8Linear.from_linear, "int4": Int4Linear.from_linear,
            "fp8": Fp8Linear.from_linear}[mode]
    layer = make(linear)
    reason = layer.use_fast_kernel()
    return layer.kernel, reason


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of the model's parameters and buffers, each distinct tensor counted once.

    Tensor subclasses (torchao and the like) report their own nbytes through their inner
    tensors, so this walks
    `__tensor_flatten__` where present instead of trusting the wrapper's element size.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _all_tensors(model):
        for leaf in _leaf_tensors(tensor):
            key = (leaf.untyped_storage().data_ptr(), leaf.untyped_storage().nbytes())
            if key in seen:
                continue
            seen.add(key)
            total += leaf.untyped_storage().nbytes()
    return total


def parameter_count(model: nn.Module) -> int:
    """Logical weight count, as before quantization: packed int8/int4 buffers count as the
    matrices they encode (plain `parameters()` would miss them, since they are buffers)."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear, Fp8Linear)):
            total += module.in_features * module.out_features
            total += 0 if module.bias is None else module.bias.numel()
        elif isinstance(module, QuantizedEmbedding):
            total += module.num_embeddings * module.embedding_dim
        elif isinstance(module, TiedQuantizedHead) and module.bias is not None:
            total += module.bias.numel()
    return total


def _all_tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def _leaf_tensors(tensor: torch.Tensor):
    if hasattr(type(tensor), "__tensor_flatten__") and type(tensor) not in (
        torch.Tensor,
        nn.Parameter,
    ):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(tensor, name))
    else:
        yield tensor.data if isinstance(tensor, nn.Parameter) else tensor


def _named_children_recursive(module: nn.Module):
    """(parent, attribute name, child) for every submodule, parents before children, once each."""
    seen: set[int] = set()
    for parent in module.modules():
        for name, child in parent.named_children():
            if id(child) not in seen:
                seen.add(id(child))
                yield parent, name, child


def _tied_pairs(model: nn.Module) -> dict[int, nn.Embedding]:
    by_weight = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        id(m): by_weight[id(m.weight)]
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) in by_weight
    }


def _quantize_fp8(model: nn.Module, device: torch.device | str | None) -> nn.Module:
    if device is not None and torch.device(device).type != "cuda":
        raise EngineError(f"fp8 quantization needs a CUDA device, but the model runs on {device}")
    if not torch.cuda.is_available():
        raise EngineError("fp8 quantization needs a CUDA GPU (sm89+); none is available")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise EngineError(
            f"fp8 quantization needs an Ada/Hopper GPU (sm89+); this one is sm{major}{minor}"
        )
    return quantize_fp8_body(model)


def quantize_fp8_body(model: nn.Module) -> nn.Module:
    """Every linear layer but the head becomes an Fp8Linear (the head and embeddings stay in
    16 bits, design/engine.md §2.5). Device-agnostic: the caller checked the hardware."""
    head_ids = {id(m) for m in _tied_pairs(model)} | {id(_output_head(model))}
    for parent, name, child in list(_named_children_recursive(model)):
        if isinstance(child, nn.Linear) and id(child) not in head_ids:
            setattr(parent, name, Fp8Linear.from_linear(child))
    return model


def use_fast_kernels(model: nn.Module) -> dict[str, str]:
    """Switch every quantized layer to its CUDA kernel, checking each distinct layer shape once.
    Returns {kind: "kernel name" or "dequant: why"}; layers whose check fails stay exact."""
    verdicts: dict[tuple, str | None] = {}
    summary: dict[str, str] = {}
    for module in model.modules():
        if not hasattr(module, "use_fast_kernel"):
            continue
        kind = type(module).__name__
        shape = (kind, getattr(module, "in_features", None), getattr(module, "out_features", None),
                 getattr(module, "mode", None))
        if shape in verdicts:
            if verdicts[shape] is None:  # this shape passed its check: switch unchecked
                module.use_fast_kernel(verify=False)
            continue
        reason = module.use_fast_kernel()
        verdicts[shape] = reason
        if reason is not None:
            log.error("quantized %s %s: fast kernel unusable, layer stays on the exact path: %s",
                      kind, shape[1:], reason)
            summary[kind] = f"dequant: {reason}"
        else:
            summary.setdefault(kind, module.kernel)
    return summary


def _output_head(model: nn.Module) -> nn.Module | None:
    """The last Linear whose out_features is the vocabulary size, if an Embedding shows it."""
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in vocab]
    return heads[-1] if heads else None
