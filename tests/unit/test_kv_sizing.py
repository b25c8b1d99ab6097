"""KV-cache sizing from device memory (`gpu_memory_utilization`, vLLM's meaning): the arithmetic,
the profile step it measures, and the refusals. The CUDA measurement itself runs in
benchmarks/gpu_check.py on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster import LLM
from cluster.config import EngineConfig, ModelConfig
from cluster.engine.scheduler import profile_plan
from cluster.model.memory import MemoryReport, kv_cache_bytes
from deployments.config import AppConfig

GIB = 1 << 30


def test_kv_takes_the_share_left_after_weights_activations_and_others() -> None:
    # 140 GiB device; PyTorch peaked at 60 GiB (incl. a 1 GiB profile KV cache); 2 GiB outside PyTorch
    r = MemoryReport(total=140 * GIB, free=140 * GIB - 62 * GIB - 2 * GIB, reserved=62 * GIB, peak_allocated=60 * GIB)
    assert kv_cache_bytes(r, 0.9, profile_kv_bytes=1 * GIB) == int(140 * GIB * 0.9) - 59 * GIB - 2 * GIB
    assert kv_cache_bytes(r, 0.5, 1 * GIB) < kv_cache_bytes(r, 0.9, 1 * GIB)
    with pytest.raises(ValueError, match="gpu_memory_utilization: 0.4 of 140.0 GiB leaves no room"):
        kv_cache_bytes(r, 0.4, 1 * GIB)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_bytes(r, 1.5, 0)


def test_profile_step_is_the_largest_the_scheduler_can_make() -> None:
    model = ModelConfig.from_dict({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 8,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_experts": 2,
                                   "num_experts_per_tok": 1, "moe_intermediate_size": 4})
    for seqs, tokens in ((8, 100), (256, 8192), (64, 10)):
        plan = profile_plan(EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens, block_size=16), model)
        assert sum(len(e.token_ids) for e in plan.entries) == tokens
        assert len(plan.entries) == min(seqs, tokens) and all(e.params is not None for e in plan.entries)
        blocks = [b for e in plan.entries for b in e.block_table]
        assert len(blocks) == len(set(blocks)) and all(len(e.block_table) * 16 >= len(e.token_ids) for e in plan.entries)
        assert set(plan.finished) == {e.request_id for e in plan.entries}


def test_utilization_is_refused_off_cuda_naming_it(moe_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization: sizes the KV cache on CUDA"):
        LLM(moe_checkpoint, dtype="float32", gpu_memory_utilization=0.5)
    with pytest.raises(ValidationError, match=r"fast\n.*gpu_memory_utilization: sizes the KV cache on CUDA"):
        AppConfig.model_validate({"fast": {"gpu_memory_utilization": 0.9}})
    with pytest.raises(ValidationError, match="thinking.engine.gpu_memory_utilization"):
        AppConfig.model_validate({"thinking": {"device": "cuda", "gpu_memory_utilization": 1.2}})
    assert AppConfig.model_validate({"thinking": {"device": "cuda", "gpu_memory_utilization": 0.9}}).thinking.engine.gpu_memory_utilization == 0.9
    with pytest.raises(ValueError, match="gpu_memory_utilization: give it or num_kv_blocks"):
        EngineConfig(gpu_memory_utilization=0.9, num_kv_blocks=8)
