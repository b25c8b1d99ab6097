"""How pool replicas share the CPUs of the host they run on. On GPUs each pool has devices of
its own; on a CPU host both pools draw on the same cores, and the latency pool must not wait
behind the throughput pool. Two levers: each replica's intra-op threads (and the CPUs it
reserves from Ray), and its scheduling priority: a replica of `cpu_priority` "low" runs in
Linux's SCHED_IDLE class, on the cycles the others leave (a weight of 3 against a normal
thread's 36 at Ray's worker nice of 15), as a throughput pool should. A nice value would not do:
Ray already starts every worker at nice 15, and a replica may not go below it."""

from __future__ import annotations

import os

import torch

from deployments.config import AppConfig


def host_cpus() -> int:
    """The cores this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def size_for_host(cfg: AppConfig, cpus: int | None = None) -> AppConfig:
    """`q3serve up`'s sizing: the CPU pools whose `cpu_threads` is unset split the host's cores,
    one core kept for Serve (proxy, controller, ingress) from 4 cores up, the odd core to the fast
    pool (its step time is its users' latency), each pool's share divided by its max replicas.
    GPU pools keep one host thread each."""
    cpus = cpus or host_cpus()
    spare = cpus - (1 if cpus >= 4 else 0)
    pools = cfg.pools()
    cpu_pools = sorted((n for n, p in pools.items() if p.parallel.device == "cpu"), key=lambda n: n != "fast")
    shares = {n: spare // len(cpu_pools) + (1 if i < spare % len(cpu_pools) else 0) for i, n in enumerate(cpu_pools)}
    update = {}
    for name, pool in pools.items():
        if pool.cpu_threads is None:
            threads = max(1, shares.get(name, 1) // pool.autoscaling.max_replicas)
            update[name] = pool.model_copy(update={"cpu_threads": threads})
    return cfg.model_copy(update=update)


def apply_cpu_settings(threads: int, priority: str) -> None:
    """Sets this process's intra-op threads and, for "low", moves every thread to SCHED_IDLE
    (Linux keeps the policy per thread, and threads started later inherit their creator's); where
    that class is missing, the lowest nice value. Nothing to do for "normal"."""
    torch.set_num_threads(max(1, threads))
    if priority != "low":
        return
    for tid in _thread_ids():
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except AttributeError:  # not Linux
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:  # the thread ended meanwhile
            pass


def priority_of(tid: int | None) -> str | None:
    """"low" or "normal" for a thread (what `cpu_priority` made of it), None if unknown."""
    try:
        return "low" if os.sched_getscheduler(tid or 0) == os.SCHED_IDLE else "normal"
    except (AttributeError, OSError):
        return None


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: this thread only
        return [0]
