"""Executors run step plans on a model instance. `LocalExecutor` holds the whole model in this
process; `RayExecutor` (cluster/parallel/instance.py) spreads it over attention-shard and expert-group
actors. The engine core talks to either through this interface, and `build_executor` picks one:
the engine's only reach into `cluster.parallel` is that function's lazy import, so that Ray is
imported only by instances that use it (vLLM's executor selection works the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from cluster import native
from cluster.config import ModelConfig, ParallelConfig
from cluster.engine.plan import Sampled, StepPlan
from cluster.model.memory import MemoryReport, kv_cache_bytes, reset_peak_memory
from cluster.model.runner import ModelRunner
from cluster.model.weights import load_model


class Executor(Protocol):
    num_shards: int

    def execute(self, plans: list[StepPlan]) -> list[list[Sampled]]: ...
    def memory_reports(self) -> list[MemoryReport]: ...   # one per attention shard (CUDA)
    def allocate_kv_cache(self, num_blocks: int) -> None: ...
    def expert_usage(self) -> torch.Tensor: ...   # [2, layers, experts]: tokens, summed weight
    def replan(self, placement: Any) -> dict: ...   # a new expert placement, between steps
    def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """The single-process instance: one attention shard, all experts local."""

    num_shards = 1

    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, num_blocks: int,
        block_size: int, max_model_len: int, cuda_graphs: bool = False, max_graph_batch: int = 64,
        static_decode: bool = False,
    ) -> None:
        reset_peak_memory(device)
        model = load_model(path, cfg, dtype, device)
        # Captured before the profile step, the graphs' memory is in its peak: counted when
        # gpu_memory_utilization sizes the KV cache (and captured again over the sized cache).
        self.runner = ModelRunner(model, cfg, num_blocks, block_size, max_model_len, dtype, device,
                                  static_decode=static_decode, cuda_graphs=cuda_graphs, max_batch=max_graph_batch)

    def execute(self, plans: list[StepPlan]) -> list[list[Sampled]]:
        return [self.runner.execute(plans[0])]

    def memory_reports(self) -> list[MemoryReport]:
        return [self.runner.memory_report()]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def expert_usage(self) -> torch.Tensor:
        return self.runner.model.expert_usage()

    def replan(self, placement: Any) -> dict:
        raise ValueError("placement: a single-process instance holds every expert; there is nothing to place")

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.runner = None  # type: ignore[assignment]


def size_kv_cache(executor: Executor, utilization: float, profile: StepPlan, profile_blocks: int,
                  block_bytes: int) -> int:
    """Runs the profile step on every shard, then gives each shard's KV cache the blocks that
    `gpu_memory_utilization` leaves on its device (the smallest such count, so all shards match)."""
    executor.execute([profile] * executor.num_shards)
    reports = executor.memory_reports()
    num_blocks = min(kv_cache_bytes(r, utilization, profile_blocks * block_bytes) for r in reports) // block_bytes
    executor.allocate_kv_cache(num_blocks)
    return num_blocks


def build_executor(
    path: Path, cfg: ModelConfig, dtype: torch.dtype, parallel: ParallelConfig, num_blocks: int, block_size: int,
    max_model_len: int, cuda_graphs: bool = False, max_graph_batch: int = 64, static_decode: bool = False,
) -> Executor:
    """In-process for a 1 x 1 instance (with decode graphs when asked), else over Ray actors."""
    args = (path, cfg, dtype, parallel.device, num_blocks, block_size, max_model_len)
    if parallel.in_process:
        return LocalExecutor(*args, cuda_graphs=cuda_graphs, max_graph_batch=max_graph_batch, static_decode=static_decode)
    native.prepare(parallel.device)  # built here once, so that the instance's actors only load it
    from cluster.parallel.instance import RayExecutor

    return RayExecutor(*args, parallel=parallel)
