"""How `q3serve up` sizes the pools for the host, and how a replica applies its CPU settings."""

from __future__ import annotations

import subprocess
import sys

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_low_priority_reaches_every_thread_and_threads_started_later() -> None:
    """In a child process (a priority is not raised back): a thread that exists before the call
    and one started after it both run in SCHED_IDLE; the intra-op threads are set."""
    code = """
import os, threading, torch
from deployments.host import apply_cpu_settings, priority_of
tids, go = [], threading.Event()
def idle():
    tids.append(threading.get_native_id()); go.wait(30)
before = threading.Thread(target=idle); before.start()
while not tids: pass
print(priority_of(0))
apply_cpu_settings(3, "low")
after = threading.Thread(target=idle); after.start()
while len(tids) < 2: pass
print(torch.get_num_threads(), *[priority_of(t) for t in tids], priority_of(0))
go.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["normal", "3", "low", "low", "low"], out.stderr
