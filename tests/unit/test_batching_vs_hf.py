"""Greedy generation under continuous batching, chunked prefill, preemption and prefix caching
equals transformers' generate for each prompt run alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import EngineConfig, SamplingParams
from cluster.engine.core import EngineCore, RequestOutput
from tests.helpers.models import hf_greedy, hf_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def _run_staggered(core: EngineCore, prompts: list[list[int]], arrive_at: list[int]) -> dict[str, RequestOutput]:
    """Adds prompt i before step arrive_at[i]; steps until everything finished."""
    done: dict[str, RequestOutput] = {}
    step = 0
    pending = sorted(range(len(prompts)), key=lambda i: arrive_at[i])
    while pending or core.has_work():
        while pending and arrive_at[pending[0]] <= step:
            i = pending.pop(0)
            core.add_request(prompts[i], GREEDY, request_id=str(i))
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 2000, "engine made no progress"
    return done


@pytest.mark.parametrize("native_kernels", ["1", "0"], ids=["native", "pytorch"])
def test_continuous_batching_chunked_prefill_preemption(moe_checkpoint: Path, monkeypatch, native_kernels: str) -> None:
    monkeypatch.setenv("Q3SERVE_NATIVE", native_kernels)
    prompts = _prompts([5, 37, 20, 3, 45, 12])
    # 4-token blocks, a 7-token step budget (every long prompt is prefilled in chunks) and a pool
    # of 24 blocks, far less than the ~60 the six sequences need together: preemption must happen.
    cfg = EngineConfig(block_size=4, num_kv_blocks=24, max_num_batched_tokens=7, max_num_seqs=8, max_model_len=80)
    core = EngineCore(moe_checkpoint, dtype="float32", config=cfg)
    done = _run_staggered(core, prompts, arrive_at=[0, 0, 3, 5, 9, 20])
    assert core.scheduler.num_preemptions > 0
    assert core.blocks.num_free == core.blocks.num_blocks, "KV blocks leaked"
    ref = hf_model(moe_checkpoint)
    for i, p in enumerate(prompts):
        assert done[str(i)].token_ids == hf_greedy(ref, p, GREEDY.max_tokens), f"prompt {i} differs"
        assert done[str(i)].finish_reason == "length"


def test_prefix_cache_computes_only_new_tokens(moe_checkpoint: Path) -> None:
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=128)
    core = EngineCore(moe_checkpoint, dtype="float32", config=cfg)
    first = _prompts([40], seed=3)[0]
    core.add_request(first, GREEDY, request_id="a")
    while core.has_work():
        core.step()
    second = first[:36] + [7, 8, 9, 10, 11, 12]
    before = core.num_computed_tokens
    core.add_request(second, GREEDY, request_id="b")
    outs = []
    while core.has_work():
        outs.extend(core.step())
    final = outs[-1]
    assert final.num_cached_tokens == 36
    # 6 new prompt tokens, then one token per decode step after the first sampled token.
    assert core.num_computed_tokens - before == 6 + GREEDY.max_tokens - 1
    assert final.token_ids == hf_greedy(hf_model(moe_checkpoint), second, GREEDY.max_tokens)


def test_prefix_cache_disabled_recomputes(moe_checkpoint: Path) -> None:
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=128, enable_prefix_caching=False)
    core = EngineCore(moe_checkpoint, dtype="float32", config=cfg)
    prompt = _prompts([20], seed=4)[0]
    for rid in ("a", "b"):
        core.add_request(prompt, GREEDY, request_id=rid)
        while core.has_work():
            outs = core.step()
        assert outs[-1].num_cached_tokens == 0


@pytest.mark.parametrize("block_size", [1, 16])
def test_block_size_extremes(moe_checkpoint: Path, block_size: int) -> None:
    prompts = _prompts([17, 2, 33], seed=5)
    core = EngineCore(moe_checkpoint, dtype="float32", config=EngineConfig(block_size=block_size, num_kv_blocks=4096 // block_size))
    done = _run_staggered(core, prompts, arrive_at=[0, 1, 2])
    ref = hf_model(moe_checkpoint)
    for i, p in enumerate(prompts):
        assert done[str(i)].token_ids == hf_greedy(ref, p, GREEDY.max_tokens)
