"""How `q3serve up` sizes the pools for the host (how a replica applies its CPU settings, in a
child process: tests/integration/test_host.py)."""

from __future__ import annotations

import pytest

from deployments.config import AppConfig
from deployments.host import size_for_host


def threads(cfg: AppConfig) -> dict[str, int | None]:
    return {n: p.cpu_threads for n, p in cfg.pools().items()}


@pytest.mark.parametrize("cpus, want", [(1, {"thinking": 1, "fast": 1}), (2, {"thinking": 1, "fast": 1}),
                                        (4, {"thinking": 1, "fast": 2}), (16, {"thinking": 7, "fast": 8})])
def test_two_cpu_pools_split_the_cores(cpus: int, want: dict[str, int]) -> None:
    assert threads(size_for_host(AppConfig(), cpus)) == want


def test_one_pool_takes_them_all_divided_by_its_replicas() -> None:
    cfg = AppConfig.model_validate({"fast": {"enabled": False}, "thinking": {"autoscaling": {"max_replicas": 3}}})
    assert threads(size_for_host(cfg, 16)) == {"thinking": 5}


def test_set_values_and_gpu_pools_are_kept() -> None:
    cfg = AppConfig.model_validate({"thinking": {"cpu_threads": 3}, "fast": {"device": "cuda"}})
    assert threads(size_for_host(cfg, 16)) == {"thinking": 3, "fast": 1}


def test_presets_yield_the_host_to_the_fast_pool() -> None:
    cfg = AppConfig()
    assert (cfg.thinking.cpu_priority, cfg.fast.cpu_priority) == ("low", "normal")
    with pytest.raises(ValueError, match="cpu_priority"):
        AppConfig.model_validate({"fast": {"cpu_priority": "high"}})
