"""Opt-in wall-clock accounting of a step by section (lm_head, attention, experts, sampling),
for the benchmark's per-step breakdown. Disabled, `section` costs one global lookup."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from collections.abc import Iterator

_totals: defaultdict[str, float] | None = None
_NULL = nullcontext()


def enable() -> None:
    global _totals
    _totals = defaultdict(float)


def disable() -> dict[str, float]:
    """Stops accounting and returns seconds spent per section."""
    global _totals
    out, _totals = dict(_totals or {}), None
    return out


def section(name: str):
    return _NULL if _totals is None else _timed(name)


@contextmanager
def _timed(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        assert _totals is not None
        _totals[name] += time.perf_counter() - start
