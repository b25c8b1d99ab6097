"""Device memory for the KV cache, as vLLM's `gpu_memory_utilization` means it: this engine may
use that fraction of the device; what is left of it after the weights, the activation peak of
the largest step (measured by running one) and the memory that is not PyTorch's (the CUDA
context, NCCL's buffers, other processes) becomes the KV cache. On CPU the pool is sized in GB
by the config instead."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryReport:
    """One device after a profile step: all in bytes."""

    total: int            # the device's memory
    free: int             # free on the device now (other processes count against it)
    reserved: int         # held by PyTorch's caching allocator now
    peak_allocated: int   # PyTorch's peak since loading began: weights + profile KV + activations


def measure(device: str | torch.device) -> MemoryReport:
    """The CUDA device's numbers (the engine core asks only for CUDA devices)."""
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    return MemoryReport(total, free, torch.cuda.memory_reserved(dev), torch.cuda.max_memory_allocated(dev))


def kv_cache_bytes(report: MemoryReport, utilization: float, profile_kv_bytes: int) -> int:
    """What the KV cache may take: utilization x total, less the peak of PyTorch's allocations
    (without the small KV cache the profile step ran with) and less what is not PyTorch's. Raises
    naming gpu_memory_utilization when nothing is left."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization: {utilization} is not in (0, 1]")
    non_torch = max(0, report.total - report.free - report.reserved)
    peak = report.peak_allocated - profile_kv_bytes
    left = int(report.total * utilization) - peak - non_torch
    if left <= 0:
        gib = 1 << 30
        raise ValueError(
            f"gpu_memory_utilization: {utilization} of {report.total / gib:.1f} GiB leaves no room for the KV cache "
            f"(weights and activation peak {peak / gib:.1f} GiB, outside PyTorch {non_torch / gib:.1f} GiB); "
            "raise it, or spread the model over more devices")
    return left


def reset_peak_memory(device: str | torch.device) -> None:
    """Starts the peak count before the weights load, so that the profile step's peak is this
    model's (a process may have held something else before)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
