"""Executors run step plans on a model instance. `LocalExecutor` holds the whole model in this
process; `RayExecutor` (cluster/parallel/instance.py) spreads it over attention-shard and expert-group
actors. The engine core talks to either through this interface."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from cluster.config import ModelConfig
from cluster.model.runner import ModelRunner
from cluster.engine.plan import Sampled, StepPlan
from cluster.model.weights import load_model


class Executor(Protocol):
    num_shards: int

    def execute(self, plans: list[StepPlan]) -> list[list[Sampled]]: ...
    def expert_counts(self) -> torch.Tensor: ...
    def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """The single-process instance: one attention shard, all experts local."""

    num_shards = 1

    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, num_blocks: int,
        block_size: int, max_model_len: int,
    ) -> None:
        model = load_model(path, cfg, dtype, device)
        self.runner = ModelRunner(model, cfg, num_blocks, block_size, max_model_len, dtype, device)

    def execute(self, plans: list[StepPlan]) -> list[list[Sampled]]:
        return [self.runner.execute(plans[0])]

    def expert_counts(self) -> torch.Tensor:
        return self.runner.model.expert_counts().clone()

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.runner = None  # type: ignore[assignment]
