"""Reads safetensors checkpoints in the hub's key layout. A caller names the tensors it owns, so
an expert-group actor reads only its experts and an attention shard never touches them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm


class CheckpointError(ValueError):
    """A checkpoint lacks a tensor or holds one of the wrong shape; the message names it."""


def tensor_index(path: str | Path) -> dict[str, Path]:
    """Maps every tensor name to the file holding it (single file or sharded index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / fname for name, fname in weight_map.items()}
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_tensors(
    path: str | Path,
    expected: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Loads exactly the tensors named in `expected` (name -> shape), checking presence and shape
    before any data is read, converting to `dtype`. A progress bar shows on loads of many files
    or when `progress` is true."""
    index = tensor_index(path)
    missing = [n for n in expected if n not in index]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor {missing[0]!r}{more}")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(index[name], []).append(name)
    show = progress if progress is not None else len(expected) > 2000 or len(by_file) > 1
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(expected), desc="Loading weights", unit="tensor", disable=not show)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(
                        f"tensor {name!r} has shape {list(shape)}, expected {list(expected[name])}"
                    )
                t = f.get_tensor(name)
                out[name] = t.to(device=device, dtype=dtype or t.dtype)
                bar.update(1)
    bar.close()
    return out

