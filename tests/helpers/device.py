"""The device check of tests/unit/test_device_hygiene.py (and of the exchange's, in
tests/distributed/test_dispatch_on_device.py): the model runs on the CPU for real while the
*default* device is `meta`, and a dispatch mode records every op whose output is off the device."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class DevicesOfEveryOp(TorchDispatchMode):
    """Records each op whose output is not on `device`."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.strays: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.strays.append(f"{func}: {t.device}")
        return out


class OnlyOnModelDevice:
    """Default device `meta` plus the dispatch check, for the duration of a step."""

    def __enter__(self) -> DevicesOfEveryOp:
        self.mode = DevicesOfEveryOp(torch.device("cpu"))
        torch.set_default_device("meta")
        self.mode.__enter__()
        return self.mode

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
        torch.set_default_device(None)
