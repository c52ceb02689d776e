"""Non-causal grouped-query attention behind one seam.

`grouped_attention` is what the model calls. It folds each kv group's query heads into the query
length: (B, L, Hq, D) queries become (B, Hkv, G*L, D), so every SDPA backend sees plain
multi-head attention over the kv heads: no repeat of K/V, and masks work with any kernel.
Padding arrives as one additive bias per pass, built once and shared by all layers.

xformers (optional, CUDA) is used only where its kernels really run: `xformers_usable()` probes
it once with a tiny call, because a wheel built for another torch imports fine and then fails
every call (design/engine.md §6). On failure it logs one line and SDPA serves the process.
CUDA-graphed passes always use SDPA.

`attend` keeps the older per-call contract (bool key mask, zeros for rows with no key): tests
and the xformers comparison use it.
"""

from __future__ import annotations

import contextvars
import functools
import logging

import torch
from torch import Tensor

from engine.api import one_line
from engine.model.sdpa import grouped_sdpa, sdpa_attend

log = logging.getLogger(__name__)

# Set while a static pass runs: its CUDA graph holds SDPA kernels, so its eager warm-ups and its
# eager twin must run the same kernels as the graph (xformers and SDPA differ in rounding).
SDPA_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("sdpa_only", default=False)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """q (B, Lq, Hq, D), k/v (B, Hkv, Lk, D), bias (B, 1, 1, Lk) additive or None
    -> (B, Lq, Hq * D). Query head h uses kv head h // (Hq / Hkv), as in SDPA's enable_gqa."""
    if q.is_cuda and not SDPA_ONLY.get() and not torch.cuda.is_current_stream_capturing() \
            and xformers_usable():
        from engine.model.xformers_attention import grouped_xformers_attention

        return grouped_xformers_attention(q, k, v, bias)
    return grouped_sdpa(q, k, v, bias)


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), key_mask (B, Lk) bool or None -> (B, Hq, Lq, D).

    Every query sees every key where key_mask is True. A row whose keys are all masked returns
    zeros rather than NaN."""
    if q.is_cuda and xformers_usable():
        from engine.model.xformers_attention import xformers_attend

        return xformers_attend(q, k, v, key_mask)
    return sdpa_attend(q, k, v, key_mask)


@functools.cache
def xformers_probe() -> tuple[bool, str]:
    """(usable, reason): one tiny real call decides for the life of the process."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import xformers.ops as xops
    except Exception as error:  # ImportError, or a build whose extension fails to load
        return False, f"xformers does not import ({one_line(error)})"
    try:
        q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        out = xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        if not bool(torch.isfinite(out).all()):
            return False, "xformers returned non-finite values on a probe call"
    except Exception as error:  # NotImplementedError when no kernel of the wheel loads
        reason = f"xformers {getattr(xops, '__version__', '')} kernels do not run here " \
                 f"({one_line(error)[:200]})"
        log.warning("attention: %s; using torch SDPA", reason)
        return False, reason
    return True, "xformers kernels run"


def xformers_usable() -> bool:
    return xformers_probe()[0]
