"""What every actor of a model instance shares: its rank in the instance's process group, the
exchange, joining and leaving the group, and the probes the engine uses (ping, stats)."""

from __future__ import annotations

from datetime import timedelta
from collections.abc import Iterable

import torch
import torch.distributed as dist

from cluster.dispatch import Exchange
from cluster.placement import ExpertPlacement


def param_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (tied weights count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class InstanceActor:
    def __init__(self, rank: int, num_shards: int, num_groups: int, placement: ExpertPlacement, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.rank = rank
        self.step_s = 0.0  # seconds spent in steps since the last stats reset
        self.exchange = Exchange(rank, num_shards, num_groups, placement, device)

    def join(self, backend: str, addr: str, port: int, world: int, timeout_s: float) -> None:
        """Joins the instance's process group; the timeout bounds every collective, so a lost
        peer turns into an error rather than a hang."""
        dist.init_process_group(
            backend, init_method=f"tcp://{addr}:{port}", rank=self.rank, world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )

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
