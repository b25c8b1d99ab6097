"""Expert placement from measured traffic on a running expert-parallel instance: each group's
rows per step are measured (and equal what the routing implies), a load-balanced map computed
from the live counters is taken between steps while requests stream, and their tokens do not
change (transformers' greedy tokens before, during and after)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.config import EngineConfig, ModelConfig, ParallelConfig
from cluster.engine.engine import Engine
from cluster.parallel.placement import ExpertPlacement, contiguous, load_balanced, load_report
from tests.helpers.expert_parallel import GREEDY, PROMPTS, expert_bytes
from tests.helpers.models import hf_greedy, hf_model

# a KV pool large enough for all five prompts at once (the expert-parallel tests' one preempts)
ENGINE = dict(dtype="float32", num_kv_blocks=32, block_size=4, max_num_batched_tokens=16, max_model_len=64)

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_measured_group_rows_follow_the_map(moe_checkpoint: Path, tmp_path: Path) -> None:
    """One prefill step: each group computed, per layer, the tokens routed to the experts it
    holds, under the contiguous map and under a load-balanced one taken by `replan` (from a
    saved file), which then holds (its param bytes) the new experts."""
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    prompt = list(range(30, 43))
    llm = LLM(moe_checkpoint, attention_shards=1, expert_groups=2, enable_prefix_caching=False, **ENGINE)
    try:
        ex = llm.core.executor

        def one_step() -> tuple[torch.Tensor, torch.Tensor]:
            before = llm.expert_usage()[0][cfg.moe_layers]
            ex.expert_group_rows(reset=True)
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
            counts = llm.expert_usage()[0][cfg.moe_layers] - before
            rows = torch.tensor(ex.expert_group_rows(), dtype=torch.float64)  # [group, layer, step]
            assert rows.shape[2] == 1
            return counts, rows[:, :, 0].T  # [layer, group]

        counts, rows = one_step()
        base = contiguous(cfg.num_experts, 2, len(cfg.moe_layers))
        assert torch.equal(rows, base.group_loads(counts))
        balanced = load_balanced(counts, num_groups=2)
        assert load_report(balanced, counts)["max_group_tokens_sum"] <= load_report(base, counts)["max_group_tokens_sum"]
        path = balanced.save(tmp_path / "map.json", report=load_report(balanced, counts))
        assert ExpertPlacement.load(path) == balanced
        out = llm.replan(str(path))
        assert out["groups"] == 2 and sum(out["layers_reloaded"]) > 0
        counts2, rows2 = one_step()
        assert torch.equal(counts2, counts)            # same prompt, same routing
        assert torch.equal(rows2, balanced.group_loads(counts))
        with pytest.raises(ValueError, match="placement"):
            llm.replan(contiguous(cfg.num_experts, 3, len(cfg.moe_layers)))
    finally:
        llm.shutdown()


def test_replan_under_streaming_load_keeps_every_token(moe_checkpoint: Path) -> None:
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    ref = hf_model(moe_checkpoint)
    reference = [hf_greedy(ref, p, GREEDY.max_tokens) for p in PROMPTS]
    limits = EngineConfig(num_kv_blocks=32, block_size=4, max_num_batched_tokens=16, max_model_len=64)  # ENGINE's
    engine = Engine(moe_checkpoint, dtype="float32", engine=limits, parallel=ParallelConfig(attention_shards=2, expert_groups=2))

    async def stream(i: int, started: asyncio.Event) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(PROMPTS[i], GREEDY, request_id=f"r{i}"):
            tokens += out.delta_token_ids
            if tokens:
                started.set()
        return tokens

    async def run() -> tuple[list[list[int]], dict, list[list[int]]]:
        events = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(stream(i, e)) for i, e in enumerate(events)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
        live = engine.expert_usage()[0][cfg.moe_layers]   # the counters so far, mid-stream
        placement = load_balanced(live, num_groups=2, redundant=2)
        assert not all(t.done() for t in tasks), "the re-plan must happen while requests stream"
        moved = await engine.replan(placement)
        during = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        after = [await stream(i, asyncio.Event()) for i in range(len(PROMPTS))]
        return during, moved, after

    try:
        during, moved, after = asyncio.run(run())
        assert sum(moved["layers_reloaded"]) > 0
        assert during == reference and after == reference
        ex = engine.core.executor
        assert ex.call_all("param_bytes", actors=ex.groups) == [5 * expert_bytes(cfg)] * 2  # 8 + 2 copies
    finally:
        engine.shutdown()


def test_single_process_engine_has_nothing_to_place(moe_checkpoint: Path) -> None:
    llm = LLM(moe_checkpoint, **ENGINE)
    try:
        with pytest.raises(ValueError, match="placement: a single-process instance"):
            llm.replan("contiguous")
    finally:
        llm.shutdown()
