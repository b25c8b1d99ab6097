"""ModelPool: one Serve replica = one Engine (and, for an expert-parallel pool, its actors). The
router streams requests through `generate`, which yields plain dicts, one per engine step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from cluster import Engine, SamplingParams
from cluster.engine.tokenizer import THINK_END, THINK_START
from deployments.config import PoolConfig
from deployments.metrics import PoolMetrics


def reasoning_tokens(ids: list[int]) -> int:
    """Output tokens of the thinking part: from <think> through </think> (or to the end when the
    output was cut inside it); 0 when the model did not think."""
    if THINK_START not in ids:
        return 0
    return ids.index(THINK_END) + 1 if THINK_END in ids else len(ids)


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

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """request: {"prompt": str | list[int], "params": SamplingParams fields, "request_id": str}.
        Yields {"delta_text", "delta_token_ids", "logprobs", "finished", "finish_reason",
        "prompt_tokens", "completion_tokens", "pool", and at the end "reasoning_tokens"}."""
        params = SamplingParams(**request["params"])
        sent_lp = 0
        async for out in self.engine.generate(request["prompt"], params, request.get("request_id")):
            lps = out.logprobs or []
            chunk = {
                "delta_text": out.delta_text, "delta_token_ids": out.delta_token_ids,
                "logprobs": lps[sent_lp:], "finished": out.finished, "finish_reason": out.finish_reason,
                "pool": self.name, "prompt_tokens": len(out.prompt_token_ids),
                "completion_tokens": len(out.token_ids),
            }
            sent_lp = len(lps)
            if out.finished:
                chunk["reasoning_tokens"] = reasoning_tokens(out.token_ids)
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
