"""ModelPool: one Serve replica = one Engine (one model instance, possibly spread over Ray actors).
A `PoolRequest` comes in; the engine's `RequestOutput` deltas stream back, each holding only what
is new since the last one (ids, text, logprobs) plus the running counts. When the engine got
ahead of the consumer, everything it produced since the last output goes out as one (the engine's
`coalesce`), so per-token messaging never caps throughput."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from cluster import Engine, ExpertUsage, RequestError, RequestOutput, SamplingParams, load_balanced, load_report, model_identity
from deployments.config import PoolConfig
from deployments.host import apply_cpu_settings, priority_of
from deployments.metrics import PoolMetrics


@dataclass
class PoolRequest:
    """The one form a request takes from the front end to the engine: the mode rides on it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # validated once, by the front end; the router applies the pool's limits
    thinking: bool          # the mode the router chose the pool by


def deltas_only(out: RequestOutput) -> RequestOutput:
    """The output without the cumulative fields the engine sets on a final one (the whole text
    and ids): what crosses to the front end is the deltas and the running counts."""
    if not out.finished:
        return out
    return dataclasses.replace(out, prompt_token_ids=None, token_ids=None, text=None, logprobs=None, top_logprobs=None)


class ModelPool:
    def __init__(self, name: str, model: str | None, pool: PoolConfig) -> None:
        self.name = name
        self.pool = pool
        apply_cpu_settings(pool.replica_cpus, pool.cpu_priority)  # before the engine starts its thread
        self.engine = Engine(model, engine=pool.engine, parallel=pool.parallel, dtype=pool.dtype)
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
                for layer in self.engine.model_config.moe_layers:
                    for expert, (n, w) in enumerate(zip(usage[0, layer].tolist(), usage[1, layer].tolist())):
                        at = {**tags, "layer": str(layer), "expert": str(expert)}
                        self.metrics.expert_load.set(int(n), tags=at)
                        self.metrics.expert_weight.set(w, tags=at)
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                pass
            await asyncio.sleep(period_s)

    async def generate(self, request: PoolRequest) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; a bad request raises cluster.RequestError naming the field."""
        async for out in self.engine.generate(request.prompt_token_ids, request.params, request.request_id,
                                              coalesce=True, stream_interval=self.pool.stream_interval,
                                              stream_max_delay_ms=self.pool.stream_max_delay_ms,
                                              stream_interval_min_streams=self.pool.stream_interval_min_streams):
            yield deltas_only(out)

    def _replica(self) -> str:
        from ray import serve

        try:
            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests constructing the class directly)
            return "local"

    def expert_usage(self) -> dict[str, Any]:
        """This replica's id and its per-expert usage since it started, the latter in the file
        format of `q3serve experts collect` (prune and place read either)."""
        replica = self._replica()
        usage = ExpertUsage.from_tensor(self.engine.expert_usage(), self.engine.model_config,
                                        model_identity(self.engine.model_path),
                                        f"pool {self.name}, replica {replica}, live counters")
        return {"replica": replica, "usage": dataclasses.asdict(usage)}

    async def replan(self, redundant: int = 0, tokens: list[list[float]] | None = None) -> dict[str, Any]:
        """Re-plans this replica's expert placement (load-balanced with `redundant` extra copies
        per layer) from `tokens` (per MoE layer and expert: the pool's counters, so every replica
        gets the same map) or else its own live counters, and moves the experts between steps;
        requests in flight pause for the move and go on unchanged."""
        groups = self.pool.parallel.expert_groups
        if groups < 2:
            raise RequestError("pool", f"pool {self.name} has one expert group: there is nothing to place")
        own = self.engine.expert_usage()[0][self.engine.model_config.moe_layers]
        counts = own if tokens is None else own.new_tensor(tokens)
        if counts.shape != own.shape:
            raise RequestError("tokens", f"expected {list(own.shape)} counts (MoE layers x experts), got {list(counts.shape)}")
        try:
            placement = load_balanced(counts, groups, redundant)
        except ValueError as exc:  # its message starts with the field: "redundant: ..."
            raise RequestError("redundant", str(exc).split(": ", 1)[-1]) from None
        before = load_report(self.engine.placement, counts)
        start = asyncio.get_running_loop().time()
        moved = await self.engine.replan(placement)
        return {"pool": self.name, "replica": self._replica(), "seconds": asyncio.get_running_loop().time() - start,
                "before": before, "after": load_report(placement, counts), **moved, "placement": placement.to_dict()}

    def stats(self) -> dict[str, Any]:
        """Queue and KV-cache state of this replica's engine, its instance's actors, and the
        replica's CPU settings (metrics, tests)."""
        return {**self.engine.stats(), "cpu_threads": torch.get_num_threads(),
                "engine_priority": priority_of(self.engine.thread_id)}

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

