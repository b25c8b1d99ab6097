"""ModelPool: one Serve replica = one Engine (one model instance, possibly spread over Ray actors).
A typed `PoolRequest` comes in; typed `PoolChunk`s stream back, each holding only what is new
since the last one (ids, text, logprobs) plus the running counts. When the engine got ahead of
the consumer, everything it produced since the last chunk goes out as one chunk (the engine's
`coalesce`), so per-token messaging never caps throughput."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from cluster import Engine, RequestError, RequestOutput, SamplingParams
from cluster import ExpertUsage, model_identity
from cluster import load_balanced, load_report
from deployments.config import PoolConfig
from deployments.host import apply_cpu_settings, priority_of
from deployments.metrics import PoolMetrics


@dataclass
class PoolRequest:
    """The one form a request takes from the front end to the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # validated once, by the front end; the router applies the pool's limits
    thinking: bool          # the mode the router chose the pool by


@dataclass
class PoolChunk:
    """What a request got since its last chunk, with running counts; the last has `finished`."""

    pool: str
    delta_token_ids: list[int]
    delta_text: str
    delta_logprobs: list[float]
    num_prompt_tokens: int
    num_output_tokens: int
    num_reasoning_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    delta_top_logprobs: list[list[tuple[int, float]]] | None = None  # when the request asked for them
    prompt_logprobs: list[float | None] | None = None  # on the first chunk, when asked for
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None

    @classmethod
    def of(cls, pool: str, out: RequestOutput) -> "PoolChunk":
        return cls(pool, out.delta_token_ids, out.delta_text, out.delta_logprobs or [], out.num_prompt_tokens,
                   out.num_output_tokens, out.num_reasoning_tokens, out.finished, out.finish_reason,
                   out.delta_top_logprobs, out.prompt_logprobs, out.prompt_top_logprobs)


class ModelPool:
    def __init__(self, name: str, model: str | None, pool: PoolConfig) -> None:
        self.name = name
        self.pool = pool
        apply_cpu_settings(pool.replica_cpus, pool.cpu_priority)  # before the engine starts its thread
        self.engine = Engine(model, **pool.engine_kwargs())
        self.metrics = PoolMetrics()
        self._publisher = asyncio.get_event_loop().create_task(self._publish())

    async def _publish(self, period_s: float = 2.0) -> None:
        """Engine gauges every few seconds (queue depth, KV use, per-expert load)."""
        tags = {"pool": self.name}
        while True:
            try:
                st = self.stats()
                self.metrics.queue.set(st["waiting"], tags=tags)
                self.metrics.running.set(st["running"], tags=tags)
                self.metrics.kv_usage.set(1 - st["kv_blocks_free"] / max(1, st["kv_blocks_total"]), tags=tags)
                usage = self.engine.expert_usage()
                for layer in self.engine.core.model_config.moe_layers:
                    for expert, (n, w) in enumerate(zip(usage[0, layer].tolist(), usage[1, layer].tolist())):
                        at = {**tags, "layer": str(layer), "expert": str(expert)}
                        self.metrics.expert_load.set(int(n), tags=at)
                        self.metrics.expert_weight.set(w, tags=at)
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                pass
            await asyncio.sleep(period_s)

    async def generate(self, request: PoolRequest) -> AsyncIterator[PoolChunk]:
        """Streams the request's chunks; a bad request raises cluster.RequestError naming the field."""
        async for out in self.engine.generate(request.prompt_token_ids, request.params, request.request_id,
                                              coalesce=True, stream_interval=self.pool.stream_interval):
            yield PoolChunk.of(self.name, out)

    def _replica(self) -> str:
        from ray import serve

        try:
            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests constructing the class directly)
            return "local"

    def expert_usage(self) -> dict[str, Any]:
        """This replica's id and its per-expert usage since it started, the latter in the file
        format of `q3serve experts collect` (prune and place read either)."""
        core = self.engine.core
        replica = self._replica()
        usage = ExpertUsage.from_tensor(self.engine.expert_usage(), core.model_config, model_identity(core.model_path),
                                        f"pool {self.name}, replica {replica}, live counters")
        return {"replica": replica, "usage": dataclasses.asdict(usage)}

    async def replan(self, redundant: int = 0, tokens: list[list[float]] | None = None) -> dict[str, Any]:
        """Re-plans this replica's expert placement (load-balanced with `redundant` extra copies
        per layer) from `tokens` (per MoE layer and expert: the pool's counters, so every replica
        gets the same map) or else its own live counters, and moves the experts between steps;
        requests in flight pause for the move and go on unchanged."""
        core = self.engine.core
        groups = self.pool.expert_groups
        if groups < 2:
            raise RequestError("pool", f"pool {self.name} has one expert group: there is nothing to place")
        own = self.engine.expert_usage()[0][core.model_config.moe_layers]
        counts = own if tokens is None else torch.tensor(tokens, dtype=own.dtype)
        if counts.shape != own.shape:
            raise RequestError("tokens", f"expected {list(own.shape)} counts (MoE layers x experts), got {list(counts.shape)}")
        try:
            placement = load_balanced(counts, groups, redundant)
        except ValueError as exc:  # its message starts with the field: "redundant: ..."
            raise RequestError("redundant", str(exc).split(": ", 1)[-1]) from None
        before = load_report(core.executor.placement, counts)
        start = asyncio.get_running_loop().time()
        moved = await self.engine.replan(placement)
        return {"pool": self.name, "replica": self._replica(), "seconds": asyncio.get_running_loop().time() - start,
                "before": before, "after": load_report(placement, counts), **moved, "placement": placement.to_dict()}

    def stats(self) -> dict[str, Any]:
        """Queue and KV-cache state of this replica's engine (metrics, tests)."""
        core = self.engine.core
        shards = core.shards
        pg = getattr(core.executor, "pg", None)
        return {
            "running": sum(len(s.running) for s in shards), "waiting": sum(len(s.waiting) for s in shards),
            "kv_blocks_free": sum(s.blocks.num_free for s in shards),
            "kv_blocks_total": sum(s.blocks.num_blocks for s in shards),
            "instance_placement_group": pg.id.hex() if pg is not None else None,
            "instance_actors": dict(getattr(core.executor, "actor_names", {})),  # role -> Ray actor name
            "cpu_threads": torch.get_num_threads(), "engine_priority": priority_of(self.engine.thread_id),
        }

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy. Off the event
        loop: pinging a stalled actor waits up to 10 s, and the streams must not wait with it."""
        await asyncio.to_thread(self.engine.check_health)

    def ready(self) -> bool:
        return self.engine.healthy

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=5)

