"""The attention-shard actor: embeddings, attention layers, router gates, norms, lm_head, the
KV cache of the sequences the engine assigns to it, and sampling. It holds no expert weights:
each MoE layer's experts are reached through the exchange."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import torch

from cluster.config import ModelConfig
from cluster.dispatch import DispatchedExperts
from cluster.instance_actor import InstanceActor, param_bytes
from cluster.model_runner import ModelRunner
from cluster.placement import ExpertPlacement
from cluster.plan import Sampled, StepPlan
from cluster.weights import load_attention_model


class AttentionShard(InstanceActor):
    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, num_blocks: int, block_size: int,
        max_model_len: int, rank: int, num_shards: int, num_groups: int, placement: ExpertPlacement, threads: int,
    ) -> None:
        super().__init__(rank, num_shards, num_groups, placement, device, threads)
        ordinal = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        model = load_attention_model(path, cfg, dtype, device, lambda layer: DispatchedExperts(self.exchange, ordinal[layer]))
        self.runner = ModelRunner(model, cfg, num_blocks, block_size, max_model_len, dtype, device)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for rank 0 to host the rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def execute(self, plan: StepPlan) -> list[Sampled]:
        start = time.perf_counter()
        try:
            return self.runner.execute(plan)
        finally:
            self.step_s += time.perf_counter() - start

    def expert_counts(self) -> torch.Tensor:
        return self.runner.model.expert_counts()

    def param_bytes(self) -> int:
        return param_bytes(self.runner.model.parameters())
