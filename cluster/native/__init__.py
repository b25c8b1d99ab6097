"""Native CPU kernels, compiled on first use with torch's extension builder and cached
(under ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR). Each has a PyTorch twin that stays the
reference: the engine uses a kernel when it builds and falls back, with one warning, when it
does not (no compiler). Q3SERVE_NATIVE=0 turns them off.

`gemm.h`: the register-blocked matmul they share; `linear.cpp`: linear layers; `moe.cpp`: fused
MoE experts; `attention.cpp`: decode attention reading the paged KV cache in place; `norm.cpp`:
RMSNorm in one pass (each file's header says why)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_SOURCES = ("bindings.cpp", "linear.cpp", "moe.cpp", "attention.cpp", "norm.cpp")
# -ffast-math lets gcc vectorise exp and reductions; it is given to the compiler only, never the
# linker, so the library does not switch the process's floating-point mode (flush-to-zero).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
_STALE_LOCK_S = 600


def enabled() -> bool:
    return os.environ.get("Q3SERVE_NATIVE", "1") != "0"


def kernels() -> ModuleType | None:
    """The compiled kernels, or None when turned off or the build failed."""
    global _module, _tried
    if _tried or not enabled():
        return _module if enabled() else None
    with _lock:
        if not _tried:
            _module = build()
            _tried = True
    return _module


def for_tensor(x: torch.Tensor) -> ModuleType | None:
    """The kernels to run on `x`, or None for the PyTorch path: they are CPU-only and have no
    backward, so a CUDA tensor or recorded autograd takes PyTorch."""
    return kernels() if x.is_cpu and not torch.is_grad_enabled() else None


def prepare(device: str | torch.device) -> None:
    """Builds (or loads) the kernels when `device` is the CPU: called at startup, so that no
    step pays for a compile under its timeout."""
    if torch.device(device).type == "cpu":
        kernels()


def cpu_tag() -> str:
    """A short fingerprint of this CPU's model and instruction sets. Builds use -march=native, so
    a build made on one CPU (say, a warm cache baked into an image) must not be loaded on another
    that lacks its instructions."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def build_directory() -> Path:
    """One directory per Python version, torch version (a build links against both) and CPU."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"{python}_torch{torch.__version__}_host{cpu_tag()}".replace("+", "_")
    path = root / f"q3serve_native_{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clear_stale_lock(directory: Path) -> None:
    """torch's builder waits, without a timeout, for the lock file of a build in progress; a
    build killed midway leaves it behind. A build takes about a minute, so an old lock is stale."""
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


def _ensure_ninja() -> None:
    """torch's builder runs `ninja` from PATH; the PyPI `ninja` package (a dependency) puts one in
    this Python's scripts folder, which a pyenv or venv Python need not have on PATH."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build() -> ModuleType | None:
    from torch.utils.cpp_extension import load

    try:
        _ensure_ninja()
        directory = build_directory()
        _clear_stale_lock(directory)
        sources = [str(Path(__file__).with_name(f)) for f in _SOURCES]
        return load(
            "q3serve_native", sources, extra_cflags=_CFLAGS, extra_include_paths=[str(Path(__file__).parent)],
            build_directory=str(directory), verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means: use the PyTorch path
        warnings.warn(f"q3serve native kernels unavailable ({type(e).__name__}: {e}); using PyTorch", stacklevel=2)
        return None
