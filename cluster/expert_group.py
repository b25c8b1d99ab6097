"""The expert-group actor: for every MoE layer, the experts the placement gives it (stacked in
local-slot order; a redundant copy is just another slot), serving dispatches in lock-step with
the attention shards. It owns no request state and no attention weights."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cluster import native
from cluster.checkpoint import load_tensors
from cluster.config import ModelConfig
from cluster.instance_actor import InstanceActor, param_bytes
from cluster.placement import ExpertPlacement
from cluster.weights import expert_tensors, stack_experts


class ExpertGroup(InstanceActor):
    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, rank: int, num_shards: int,
        num_groups: int, placement: ExpertPlacement, threads: int,
    ) -> None:
        super().__init__(rank, num_shards, num_groups, placement, device, threads)
        self.dtype = dtype
        mine = placement.experts_of(rank - num_shards)
        layers = cfg.moe_layers
        expected: dict[str, tuple[int, ...]] = {}
        for ordinal, layer in enumerate(layers):
            expected.update(expert_tensors(cfg, layer, sorted(set(mine[ordinal]))))
        t = load_tensors(path, expected, dtype=dtype, device=device)
        self.weights = [stack_experts(t, layer, mine[ordinal]) for ordinal, layer in enumerate(layers)]
        native.prepare(device)

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
