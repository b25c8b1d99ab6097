"""Host-to-device inputs without a host sync. On CUDA a copy from pageable memory waits for the
stream before it starts (CUDA's documented behaviour for pageable transfers), so every per-step
`torch.tensor(list, device=cuda)` stalls the host; a copy from pinned memory is queued and
returns at once. `StagingBuffer` lays a step's fixed inputs out in one pinned host buffer and
one device buffer of the same layout, so that a step's inputs go over in one non-blocking copy
and the device views keep their addresses (what a CUDA graph replays on). `upload` moves a
step's variable-sized extras (penalty histories, logit bias, grammar masks) the same way."""

from __future__ import annotations

import math

import torch


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (a CPU tensor) in page-locked memory when it is headed for a CUDA device."""
    return t.pin_memory() if device.type == "cuda" else t


def upload(data: torch.Tensor | list, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor (or a list, made into one on the CPU) on `device`: from pinned memory and
    non-blocking on CUDA (no host sync), as is on the CPU."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype, device="cpu")
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return pinned(t, device).to(device, non_blocking=True)


class StagingBuffer:
    """Named fields of fixed shape and dtype, packed (8-byte aligned) into one byte buffer on the
    host and one on the device. Write into `host(name)`, call `upload(nbytes)`, read `device(name)`.
    Fields are laid out in the order given, so a step that fills only a prefix (the rows of a
    smaller batch) copies only that prefix: put the per-row fields first and the widest last."""

    def __init__(self, fields: list[tuple[str, tuple[int, ...], torch.dtype]], device: torch.device | str) -> None:
        target = torch.device(device)
        self.offsets: dict[str, int] = {}
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        end = 0
        for name, shape, dtype in fields:
            end = -(-end // 8) * 8
            self.offsets[name] = end
            self.specs[name] = (shape, dtype)
            end += math.prod(shape) * dtype.itemsize
        self.nbytes = -(-end // 8) * 8
        self._host = pinned(torch.zeros(self.nbytes, dtype=torch.uint8), target)
        self._dev = torch.zeros(self.nbytes, dtype=torch.uint8, device=target)
        self._host_views = {n: self._view(self._host, n) for n in self.specs}
        self._dev_views = {n: self._view(self._dev, n) for n in self.specs}

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        shape, dtype = self.specs[name]
        start = self.offsets[name]
        return buf[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def host(self, name: str) -> torch.Tensor:
        return self._host_views[name]

    def device(self, name: str) -> torch.Tensor:
        return self._dev_views[name]

    def end_of(self, name: str, rows: int) -> int:
        """The byte just past the first `rows` rows of field `name`."""
        shape, dtype = self.specs[name]
        return self.offsets[name] + rows * math.prod(shape[1:]) * dtype.itemsize

    def upload(self, nbytes: int | None = None) -> None:
        """One copy of the first `nbytes` (all by default) to the device; non-blocking from
        pinned memory on CUDA. On the CPU the device buffer is a second host buffer."""
        n = self.nbytes if nbytes is None else nbytes
        self._dev[:n].copy_(self._host[:n], non_blocking=True)
