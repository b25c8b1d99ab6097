"""The expert-group actor: for every MoE layer, the experts the placement gives it (stacked in
local-slot order; a redundant copy is just another slot), serving dispatches in lock-step with
the attention shards. It owns no request state and no attention weights."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cluster.attention_shard import join_process_group, param_bytes
from cluster.checkpoint import load_tensors
from cluster.config import ModelConfig
from cluster.dispatch import Exchange
from cluster.placement import ExpertPlacement
from cluster.weights import expert_tensors, stack_experts


class ExpertGroup:
    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, rank: int, num_shards: int,
        num_groups: int, placement: ExpertPlacement, threads: int,
    ) -> None:
        torch.set_num_threads(threads)
        self.rank = rank
        self.step_s = 0.0
        self.dtype = dtype
        self.exchange = Exchange(rank, num_shards, num_groups, placement, device)
        group = rank - num_shards
        layers = cfg.moe_layers
        mine = placement.experts_of(group)
        expected: dict[str, tuple[int, ...]] = {}
        for ordinal, layer in enumerate(layers):
            expected.update(expert_tensors(cfg, layer, sorted(set(mine[ordinal]))))
        t = load_tensors(path, expected, dtype=dtype, device=device)
        self.weights = [stack_experts(t, layer, mine[ordinal]) for ordinal, layer in enumerate(layers)]

    def join(self, backend: str, addr: str, port: int, world: int, timeout_s: float) -> None:
        join_process_group(backend, addr, port, self.rank, world, timeout_s)

    @torch.inference_mode()
    def serve_step(self, _tick: object = None) -> None:
        """Serves one engine step: every MoE layer's exchange, in order. (`_tick` is the step's
        input in the compiled graph; groups need nothing from it.)"""
        start = time.perf_counter()
        for ordinal, (w_gate_up, w_down) in enumerate(self.weights):
            self.exchange.serve(ordinal, w_gate_up, w_down, self.dtype)
        self.step_s += time.perf_counter() - start

    def param_bytes(self) -> int:
        return param_bytes(t for pair in self.weights for t in pair)

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
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
