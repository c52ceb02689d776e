"""Count what a piece of code dispatches: ATen ops (views excluded) and host syncs.

A denoising pass is launch-bound on a GPU, so the number of ops it dispatches is a speed
figure that can be measured on any machine (`make bench` reports it as aten_ops_per_pass), and
a host sync inside the loop stalls the GPU queue, so the loop's syncs are counted too.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make a CUDA host wait for the device: scalar reads, data-dependent output shapes.
# (Copies to the host are recognised by their target device.)
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero",
            "aten.masked_select", "aten.equal", "aten.unique")


class DispatchCounter(TorchDispatchMode):
    """`with DispatchCounter() as c: ...` then c.ops (non-view ATen ops) and c.syncs."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if not func.is_view:
            self.ops += 1
        to_host = name.startswith(("aten.to.", "aten._to_copy", "aten.copy_")) and (
            str(kwargs.get("device", "")) == "cpu" or _copies_to_host(name, args))
        if to_host or name.startswith(SYNC_OPS) or _bool_index(name, args):
            self.syncs += 1
        return func(*args, **kwargs)


def _bool_index(name: str, args) -> bool:
    if not name.startswith("aten.index.Tensor"):
        return False
    return any(t is not None and t.dtype == torch.bool for t in args[1])


def _copies_to_host(name: str, args) -> bool:
    """copy_(cpu_dst, cuda_src): a device-to-host copy spelled as an in-place copy."""
    return name.startswith("aten.copy_") and len(args) >= 2 and args[0].device.type == "cpu" \
        and args[1].device.type != "cpu"
