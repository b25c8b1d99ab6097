"""Prompt logprobs (vLLM's `prompt_logprobs`, what lm-evaluation-harness scores log-likelihood
with) against transformers' log-softmax over the same prompt, through chunked prefill, next to a
prefix-cache hit it must not take, and `max_tokens=0` (the prompt only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.helpers.models import hf_model


def _reference(path: Path, prompt: list[int]) -> tuple[list[float], list[list[int]]]:
    ref = hf_model(path)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), dim=-1)
    values = [float(logp[p, prompt[p + 1]]) for p in range(len(prompt) - 1)]
    return values, logp[:-1].topk(3, dim=-1).indices.tolist()


def test_prompt_logprobs_match_transformers_across_chunks_and_cache(moe_checkpoint: Path) -> None:
    prompt = list(range(40, 77))  # 37 tokens over chunks of 16
    want, want_top = _reference(moe_checkpoint, prompt)
    llm = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    try:
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))  # caches the prompt's blocks
        (out,) = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
        assert out.num_cached_tokens == 0, "a prompt-logprobs request computes every position"
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4)
        assert [[t for t, _ in row] for row in out.prompt_top_logprobs[1:]] == want_top
        assert len(out.token_ids) == 2
        (only,) = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))
        assert only.token_ids == [] and only.finish_reason == "length" and only.text == ""
        assert only.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4) and only.prompt_top_logprobs is None
    finally:
        llm.shutdown()


def test_streamed_prompt_logprobs_come_with_the_first_output(moe_checkpoint: Path) -> None:
    import asyncio

    from cluster import Engine, EngineConfig

    prompt = list(range(5, 25))

    async def run() -> list:
        engine = Engine(moe_checkpoint, dtype="float32", engine=EngineConfig(num_kv_blocks=32))
        try:
            return [o async for o in engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0,
                                                                           ignore_eos=True, prompt_logprobs=0))]
        finally:
            engine.shutdown()

    outs = asyncio.run(run())
    assert outs[0].prompt_logprobs is not None and len(outs[0].prompt_logprobs) == len(prompt)
    assert outs[-1].prompt_logprobs == outs[0].prompt_logprobs
