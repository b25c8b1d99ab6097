"""Triton kernels for NVIDIA GPUs: paged decode attention (`attention.py`), fused residual-add +
RMSNorm and q/k-norm + RoPE + KV-cache write (`norm_rope.py`), grouped MoE in bf16 and FP8
(`moe.py`). Each has a PyTorch twin in `cluster/model` that stays the reference.

The model takes them through `for_tensor(x)`, as it takes the native CPU kernels: on CUDA tensors
when Triton imports and they are switched on (`Q3SERVE_TRITON=0` or `use(False)` turns them off,
so that one process can time both paths); on CPU tensors only under `use(True, on_cpu=True)`
with `TRITON_INTERPRET=1` set before this package's kernel modules are imported (the tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

_state = {"enabled": os.environ.get("Q3SERVE_TRITON", "1") != "0", "on_cpu": False}


def _ops() -> ModuleType | None:
    try:
        from cluster.kernels.gpu import ops
    except ImportError:  # no Triton: the PyTorch twins run
        return None
    return ops


def for_tensor(x: torch.Tensor) -> ModuleType | None:
    """The kernel entry points (`cluster.kernels.gpu.ops`) to run on `x`, or None for PyTorch.
    Called several times per layer: the CPU's answer comes first and cheaply."""
    if x.is_cpu and not _state["on_cpu"]:
        return None
    if not _state["enabled"] or torch.is_grad_enabled():
        return None
    if x.is_cuda or (x.is_cpu and os.environ.get("TRITON_INTERPRET") == "1"):
        return _ops()
    return None


@contextmanager
def use(enabled: bool, on_cpu: bool = False) -> Iterator[None]:
    """Switches the kernels on or off for the duration (and, with `on_cpu`, on CPU tensors under
    the interpreter); restores the previous state after."""
    before = dict(_state)
    _state.update(enabled=enabled, on_cpu=on_cpu)
    try:
        yield
    finally:
        _state.update(before)
