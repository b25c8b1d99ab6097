"""The attention-shard actor: embeddings, attention layers, router gates, norms, lm_head, the
KV cache of the sequences the engine assigns to it, and sampling. It holds no expert weights:
each MoE layer's experts are reached through the exchange."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.config import ModelConfig
from cluster.dispatch import DispatchedExperts, Exchange
from cluster.model_runner import ModelRunner
from cluster.placement import ExpertPlacement
from cluster.plan import Sampled, StepPlan
from cluster.weights import load_attention_model


def param_bytes(tensors) -> int:  # noqa: ANN001
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def join_process_group(backend: str, addr: str, port: int, rank: int, world: int, timeout_s: float) -> None:
    """Every actor of an instance joins one group; the timeout bounds every collective, so a
    lost peer turns into an error rather than a hang."""
    dist.init_process_group(
        backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


class AttentionShard:
    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, num_blocks: int, block_size: int,
        max_model_len: int, rank: int, num_shards: int, num_groups: int, placement: ExpertPlacement, threads: int,
    ) -> None:
        torch.set_num_threads(threads)
        self.rank = rank
        self.step_s = 0.0
        self.exchange = Exchange(rank, num_shards, num_groups, placement, device)
        ordinal = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        model = load_attention_model(path, cfg, dtype, device, lambda layer: DispatchedExperts(self.exchange, ordinal[layer]))
        self.runner = ModelRunner(model, cfg, num_blocks, block_size, max_model_len, dtype, device)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for rank 0 to host the rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, backend: str, addr: str, port: int, world: int, timeout_s: float) -> None:
        join_process_group(backend, addr, port, self.rank, world, timeout_s)

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

    def exchange_stats(self, reset: bool = False) -> dict:
        """Exchange bytes per MoE layer and seconds in steps, collectives and expert matmuls."""
        s = self.exchange.stats
        out = {"hidden_bytes": list(s.hidden_bytes), "index_bytes": list(s.index_bytes), "comm_s": s.comm_s,
               "experts_s": s.experts_s, "step_s": self.step_s}
        if reset:
            s.reset(len(s.hidden_bytes))
            self.step_s = 0.0
        return out

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
