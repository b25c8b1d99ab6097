"""Reads safetensors checkpoints in the hub's key layout, one tensor at a time. A caller names the
tensors it owns, so an expert-group actor reads only its experts and an attention shard never
touches them.

The files are read with plain reads into a fresh buffer per tensor, not memory-mapped: pages of a
mapped file that were touched stay in the process's resident set while the file is open, so a
mapped load holds the checkpoint and the model at once. Here the host holds one tensor at a time.

FP8 checkpoints in Qwen's layout (e4m3 weights, a float32 `<name>_scale_inv` per block of
`weight_block_size`) are dequantized block-wise as they are read (`dequantize_fp8`), except the
tensors a caller keeps in FP8 (cluster/model/fp8.py), which come as (values, scales) pairs."""

from __future__ import annotations

import json
import struct
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from tqdm.auto import tqdm

Shape = tuple[int, ...]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"


class Fp8Tensor(NamedTuple):
    """A block-scaled FP8 weight as stored: e4m3 values and a float32 scale per block."""

    q: torch.Tensor
    scale_inv: torch.Tensor


class CheckpointError(ValueError):
    """A checkpoint lacks a tensor or holds one of the wrong shape; the message names it."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: Shape
    start: int
    end: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors of one .safetensors file, from its JSON header (no tensor data is read)."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {file.name} has dtype {info['dtype']}, which q3serve cannot read")
        begin, end = info["data_offsets"]
        out[name] = TensorEntry(file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return out


def tensor_index(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint (single file or sharded index), by name."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    out: dict[str, TensorEntry] = {}
    for fname in files:
        out.update(read_header(path / fname))
    return out


def read_tensor(f: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """One tensor's bytes, read into a buffer of its own (no mapping of the file)."""
    nbytes = entry.end - entry.start
    if nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    buf = bytearray(nbytes)
    f.seek(entry.start)
    if f.readinto(buf) != nbytes:
        raise CheckpointError(f"{entry.file.name} ends inside a tensor (bytes {entry.start}..{entry.end})")
    return torch.frombuffer(buf, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)


def scale_shape(shape: Shape, block: Shape) -> Shape:
    """The shape of a block-scaled weight's scales: one per (possibly ragged) block."""
    return tuple(-(-n // b) for n, b in zip(shape, block))


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: Shape, dtype: torch.dtype) -> torch.Tensor:
    """W = q * scale_inv of q's block, computed in float64 (exact: an e4m3 value times a float32
    scale fits a double) and rounded once to `dtype`. Blocks at the right and bottom edges may be
    partial (shapes not divisible by the block)."""
    rows, cols = q.shape
    br, bc = block
    scale = scale_inv.to(torch.float64).repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (q.to(torch.float64) * scale).to(dtype)


def iter_tensors(
    path: str | Path, expected: Mapping[str, Shape], fp8_block: Shape | None = None,
    dtype: torch.dtype | None = None, progress: bool | None = None, keep_fp8: Container[str] = (),
) -> Iterator[tuple[str, torch.Tensor | Fp8Tensor]]:
    """Yields exactly the tensors named in `expected` (name -> shape), one at a time in file
    order, after checking presence and shapes of all of them before any data is read. An FP8
    tensor comes dequantized to `dtype` (its scales are found beside it), or as an `Fp8Tensor`
    when named in `keep_fp8`; others come as stored.
    A progress bar shows on loads of many files or when `progress` is true."""
    index = tensor_index(path)
    missing = [n for n in expected if n not in index]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor {missing[0]!r}{more}")
    for name, shape in expected.items():
        entry = index[name]
        if entry.shape != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(entry.shape)}, expected {list(shape)}")
        if entry.dtype in _FP8:
            _check_scales(path, index, name, entry, fp8_block)
    names = sorted(expected, key=lambda n: (index[n].file, index[n].start))
    show = progress if progress is not None else len(expected) > 2000 or len({index[n].file for n in names}) > 1
    handles: dict[Path, BinaryIO] = {}

    def read(entry: TensorEntry) -> torch.Tensor:
        if entry.file not in handles:
            handles[entry.file] = open(entry.file, "rb")  # noqa: SIM115 - closed below
        return read_tensor(handles[entry.file], entry)

    try:
        for name in tqdm(names, desc="Loading weights", unit="tensor", disable=not show):
            entry = index[name]
            t = read(entry)
            if entry.dtype in _FP8:
                scale = read(index[name + SCALE_SUFFIX])
                if name in keep_fp8:
                    yield name, Fp8Tensor(t, scale)
                    continue
                t = dequantize_fp8(t, scale, fp8_block, dtype or torch.float32)  # type: ignore[arg-type]
            yield name, t
    finally:
        for f in handles.values():
            f.close()


def _check_scales(path: str | Path, index: Mapping[str, TensorEntry], name: str, entry: TensorEntry,
                  fp8_block: Shape | None) -> None:
    if fp8_block is None:
        raise CheckpointError(f"tensor {name!r} is FP8 but config.json of {path} has no quantization_config "
                              "(its block scales cannot be applied)")
    scale = index.get(name + SCALE_SUFFIX)
    if scale is None:
        raise CheckpointError(f"checkpoint {path} is missing tensor {name + SCALE_SUFFIX!r} (the scales of FP8 {name!r})")
    want = scale_shape(entry.shape, fp8_block)
    if scale.shape != want:
        raise CheckpointError(f"tensor {name + SCALE_SUFFIX!r} has shape {list(scale.shape)}, expected {list(want)} "
                              f"for blocks of {list(fp8_block)}")


def load_tensors(
    path: str | Path, expected: Mapping[str, Shape], dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", progress: bool | None = None, fp8_block: Shape | None = None,
) -> dict[str, torch.Tensor]:
    """All of `expected` at once, converted to `dtype` (for tools and tests; the model loaders
    use `iter_tensors` and copy each tensor into its parameter as it is read)."""
    return {name: t.to(device=device, dtype=dtype or t.dtype)
            for name, t in iter_tensors(path, expected, fp8_block, dtype, progress)}
