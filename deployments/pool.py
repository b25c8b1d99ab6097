"""ModelPool: one Serve replica = one Engine (one model instance, possibly spread over Ray actors).
A typed `PoolRequest` comes in; typed `PoolChunk`s stream back, each holding only what is new
since the last one (ids, text, logprobs) plus the running counts. When the engine got ahead of
the consumer, everything it produced since the last chunk goes out as one chunk, so per-token
messaging never caps throughput."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cluster import Engine, RequestOutput, SamplingParams
from deployments.config import PoolConfig
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
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_logprobs: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_reasoning_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None

    def absorb(self, out: RequestOutput) -> None:
        """Adds one engine output (a later step) to this chunk."""
        self.delta_token_ids += out.delta_token_ids
        self.delta_text += out.delta_text
        self.delta_logprobs += out.delta_logprobs or []
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens
        self.num_reasoning_tokens = out.num_reasoning_tokens
        self.finished = out.finished
        self.finish_reason = out.finish_reason


class ModelPool:
    def __init__(self, name: str, model: str | None, pool: PoolConfig) -> None:
        self.name = name
        self.pool = pool
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
                counts = self.engine.expert_counts()
                for layer in self.engine.core.model_config.moe_layers:
                    for expert, n in enumerate(counts[layer].tolist()):
                        self.metrics.expert_load.set(n, tags={**tags, "layer": str(layer), "expert": str(expert)})
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                pass
            await asyncio.sleep(period_s)

    async def generate(self, request: PoolRequest) -> AsyncIterator[PoolChunk]:
        """Streams the request's chunks; a bad request raises cluster.RequestError naming the field."""
        stream = self.engine.generate(request.prompt_token_ids, request.params, request.request_id)
        async for chunk in coalesce(stream, self.name):
            yield chunk

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
        }

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        self.engine.check_health()

    def ready(self) -> bool:
        return self.engine.healthy

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=5)


async def coalesce(outputs: AsyncIterator[RequestOutput], pool: str) -> AsyncIterator[PoolChunk]:
    """One chunk per turn of the consumer: the engine's outputs are pulled as one task, and what
    arrived while the last chunk was being sent is merged into the next."""
    ready: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()

    async def pull() -> None:
        try:
            async for out in outputs:
                ready.put_nowait(out)
            ready.put_nowait(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            ready.put_nowait(exc)

    task = asyncio.get_running_loop().create_task(pull())
    try:
        while True:
            item = await ready.get()  # the engine's own request timeout bounds this wait
            chunk = PoolChunk(pool)
            while True:
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                chunk.absorb(item)
                if chunk.finished or ready.empty():
                    break
                item = ready.get_nowait()
            yield chunk
            if chunk.finished:
                return
    finally:
        task.cancel()  # a consumer that left early: the engine stream closes and aborts the request
        await asyncio.gather(task, return_exceptions=True)
        await outputs.aclose()
