"""What machine a measurement ran on, for the results it is written into."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe_machine() -> str:
    """CPU model, vector ISA, core count and torch version, e.g. 'AMD EPYC (AVX2), 2 cores, torch
    2.13.0+cpu': the native kernels' speed depends on the ISA."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    except (OSError, StopIteration):
        isa = "?"
    return f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}"
