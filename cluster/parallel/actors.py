"""The actors of one model instance. Every actor has its rank in the instance's process group
and the exchange (`InstanceActor`); an `AttentionShard` holds embeddings, attention, router gates,
norms, lm_head, its sequences' KV cache and sampling, and reaches each MoE layer's experts through
the exchange; an `ExpertGroup` holds, for every MoE layer, the experts the placement gives it
(stacked in local-slot order; a redundant copy is just another slot) and serves dispatches in
lock-step with the shards. Expert groups own no request state and no attention weights. In the
colocated layout there are no `ExpertGroup` actors: each `AttentionShard` also holds the expert
group of its own rank and serves it inside its dispatches (cluster/parallel/dispatch.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cluster import native
from cluster.config import ModelConfig
from cluster.engine.plan import Sampled, StepPlan
from cluster.model.memory import MemoryReport, reset_peak_memory
from cluster.model.runner import ModelRunner
from cluster.model.fp8 import Fp8Experts
from cluster.model.weights import ExpertStack, load_attention_model, load_expert_stacks
from cluster.parallel.dispatch import DispatchedExperts, Exchange
from cluster.parallel.placement import ExpertPlacement


def param_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (tied weights count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def expert_tensors(stacks: list[ExpertStack] | None) -> list[torch.Tensor]:
    """Every tensor of an expert group's stacks, bf16 pairs or FP8 values and scales."""
    return [t for stack in stacks or [] for t in (stack.tensors() if isinstance(stack, Fp8Experts) else stack)]


class InstanceActor:
    def __init__(
        self, rank: int, num_shards: int, num_groups: int, placement: ExpertPlacement, device: str, threads: int,
        colocated: bool = False,
    ) -> None:
        torch.set_num_threads(threads)
        self.rank = rank
        self.step_s = 0.0  # seconds spent in steps since the last stats reset
        self.exchange = Exchange(rank, num_shards, num_groups, placement, device, colocated)
        self.group: int | None = None  # the expert group this rank holds, if any
        self.expert_source: tuple[Path, ModelConfig, torch.dtype, str] | None = None

    def hold_experts(self, group: int, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str,
                     placement: ExpertPlacement) -> None:
        """Loads expert group `group`'s experts under `placement` (and remembers where from)."""
        self.group, self.expert_source = group, (path, cfg, dtype, device)
        self.exchange.experts = load_expert_stacks(path, cfg, dtype, device, placement.experts_of(group))
        native.prepare(device)

    @torch.inference_mode()
    def replan(self, placement: ExpertPlacement) -> int:
        """Takes a new placement between two steps (the engine runs none meanwhile): the routing
        tables, and on a rank with experts the stacks of the experts it holds now, read again
        from the checkpoint one MoE layer at a time (so one layer's stack is held twice at
        most). Layers whose experts did not change keep their stacks. Returns the layers reloaded."""
        reloaded = 0
        if self.group is not None and self.exchange.experts is not None:
            path, cfg, dtype, device = self.expert_source  # type: ignore[misc]
            old = self.exchange.placement.experts_of(self.group)
            new = placement.experts_of(self.group)
            for ordinal in range(placement.num_layers):
                if old[ordinal] != new[ordinal]:
                    self.exchange.experts[ordinal] = load_expert_stacks(path, cfg, dtype, device, new, [ordinal])[0]
                    reloaded += 1
        self.exchange.set_placement(placement)
        return reloaded

    def join(self, backend: str, addr: str, port: int, world: int, timeout_s: float) -> None:
        """Joins the instance's process group; the timeout bounds every collective, so a lost
        peer turns into an error rather than a hang."""
        dist.init_process_group(
            backend, init_method=f"tcp://{addr}:{port}", rank=self.rank, world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )

    def exchange_stats(self, reset: bool = False) -> dict:
        """Exchange bytes per MoE layer, seconds in steps, collectives and expert matmuls, and
        (ranks with experts) the rows computed per layer in each recent step."""
        s = self.exchange.stats
        out = {"hidden_bytes": list(s.hidden_bytes), "index_bytes": list(s.index_bytes), "comm_s": s.comm_s,
               "experts_s": s.experts_s, "step_s": self.step_s, "expert_rows": [list(r) for r in s.expert_rows]}
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


class AttentionShard(InstanceActor):
    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, num_blocks: int, block_size: int,
        max_model_len: int, rank: int, num_shards: int, num_groups: int, placement: ExpertPlacement, threads: int,
        colocated: bool = False,
    ) -> None:
        super().__init__(rank, num_shards, num_groups, placement, device, threads, colocated)
        if colocated:  # this rank is expert group `rank` as well
            self.hold_experts(rank, path, cfg, dtype, device, placement)
        ordinal = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        reset_peak_memory(device)
        model = load_attention_model(path, cfg, dtype, device, lambda layer: DispatchedExperts(self.exchange, ordinal[layer]))
        self.runner = ModelRunner(model, cfg, num_blocks, block_size, max_model_len, dtype, device)

    def memory_report(self) -> MemoryReport:
        return self.runner.memory_report()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

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

    def expert_usage(self) -> torch.Tensor:
        return self.runner.model.expert_usage()

    def param_bytes(self) -> int:
        return param_bytes([*self.runner.model.parameters(), *expert_tensors(self.exchange.experts)])


class ExpertGroup(InstanceActor):
    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, rank: int, num_shards: int,
        num_groups: int, placement: ExpertPlacement, threads: int,
    ) -> None:
        super().__init__(rank, num_shards, num_groups, placement, device, threads)
        self.dtype = dtype
        self.hold_experts(rank - num_shards, path, cfg, dtype, device, placement)

    @torch.inference_mode()
    def serve_step(self, _tick: object = None) -> None:
        """Serves one engine step: every MoE layer's exchange, in order. (`_tick` is the step's
        input in the compiled graph; groups need nothing from it.)"""
        start = time.perf_counter()
        for ordinal in range(len(self.exchange.experts or [])):
            self.exchange.serve(ordinal, self.dtype)
        self.step_s += time.perf_counter() - start

    def param_bytes(self) -> int:
        return param_bytes(expert_tensors(self.exchange.experts))
