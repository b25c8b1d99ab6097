"""Losing an expert-group actor mid-generation ends the in-flight requests with an error that
names it, within seconds, marks the engine unhealthy, and leaves Ray able to build a new one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import ray

from cluster import LLM, Engine, EngineConfig, EngineDeadError, ParallelConfig, SamplingParams

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_killed_expert_group_fails_requests(moe_checkpoint: Path) -> None:
    engine = Engine(
        moe_checkpoint, dtype="float32", engine=EngineConfig(num_kv_blocks=256, block_size=4),
        parallel=ParallelConfig(attention_shards=1, expert_groups=2, step_timeout_s=20),
    )
    victim = engine.core.executor.groups[1]
    started = asyncio.Event()

    async def stream(prompt: list[int]) -> int:
        n = 0
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=900, ignore_eos=True)):
            n += 1
            started.set()
            await asyncio.sleep(0.01)
        return n

    async def main() -> tuple[list, float]:
        tasks = [asyncio.create_task(stream(p)) for p in ([1, 2, 3], [4, 5, 6, 7])]
        await asyncio.wait_for(started.wait(), 60)
        ray.kill(victim)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        return results, time.monotonic() - t0

    try:
        results, elapsed = asyncio.run(main())
        print(f"failure reported after {elapsed:.1f}s")
        assert elapsed < 30
        for r in results:
            assert isinstance(r, EngineDeadError), r
            assert "expert-group-1" in str(r)
        assert not engine.healthy
        with pytest.raises(EngineDeadError):
            engine.check_health()
    finally:
        engine.shutdown()
    # Ray still serves: a fresh instance builds and generates.
    llm = LLM(moe_checkpoint, attention_shards=1, expert_groups=2, dtype="float32", num_kv_blocks=64)
    try:
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4
    finally:
        llm.shutdown()
