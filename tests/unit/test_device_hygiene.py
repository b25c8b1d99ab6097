"""Every tensor a step creates is created on the model's device (DESIGN.md's device rules).

A CPU machine cannot run CUDA, so the test makes the mistake visible another way: the model runs
on the CPU for real while the *default* device is `meta`. A tensor created without naming the
model's device (`torch.arange(n)`, `torch.tensor(ids)`, indexing with a Python list) then lands
on `meta`, where it either raises on meeting a CPU tensor (as a CPU tensor meeting CUDA ones
would) or is caught by the dispatch mode, which checks the device of every op's output. That
is the class of bug that kills every non-greedy request, prefix-cache hit and later prefill
chunk on a GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.config import ModelConfig
from cluster.engine.plan import PlanEntry, StepPlan
from cluster.model.runner import ModelRunner
from cluster.model.weights import load_model
from tests.helpers.device import OnlyOnModelDevice

SAMPLED = [
    SamplingParams(max_tokens=4, temperature=0),
    SamplingParams(max_tokens=4, temperature=0.8),
    SamplingParams(max_tokens=4, temperature=0.7, top_p=0.8, top_k=20),
    SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, min_p=0.05, seed=7, logprobs=True),
]


def _plans() -> dict[str, StepPlan]:
    """One plan per step kind, over a block size of 4; the block tables are consistent, so a
    later plan reads what an earlier one wrote."""
    g, s = SAMPLED[0], SAMPLED[2]
    prompt = list(range(10, 20))
    return {
        "first prefill": StepPlan([PlanEntry("a", prompt[:6], 0, [0, 1], None)]),
        "later chunk": StepPlan([PlanEntry("a", prompt[6:], 6, [0, 1, 2], g)]),
        "prefill over a cached prefix": StepPlan([PlanEntry("b", [50, 51, 52], 8, [0, 1, 3], s)]),
        "pure decode": StepPlan([PlanEntry("a", [33], 10, [0, 1, 2], SAMPLED[1]),
                                 PlanEntry("b", [34], 11, [0, 1, 3], SAMPLED[3])]),
        # preempted after 2 generated tokens, its blocks released but the prefix still cached:
        "resumed preemption": StepPlan([PlanEntry("a", [33, 35], 10, [0, 1, 2], g),
                                        PlanEntry("c", list(range(60, 66)), 0, [4, 5], s)]),
        "decode and prefill": StepPlan([PlanEntry("b", [36], 12, [0, 1, 3, 6], SAMPLED[3]),
                                        PlanEntry("d", list(range(70, 75)), 4, [0, 7, 8], SAMPLED[1])], ["a"]),
    }


def test_every_step_kind_creates_tensors_only_on_the_model_device(moe_checkpoint: Path) -> None:
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    runner = ModelRunner(load_model(moe_checkpoint, cfg, torch.float32), cfg, num_blocks=16, block_size=4,
                         max_model_len=64, dtype=torch.float32)
    for kind, plan in _plans().items():
        with OnlyOnModelDevice() as mode:
            got = runner.execute(plan)
        assert not mode.strays, f"{kind}: {mode.strays[:5]}"
        assert len(got) == sum(e.params is not None for e in plan.entries)
        assert all(isinstance(x.token, int) and 0 <= x.token < cfg.vocab_size for x in got), kind


def test_the_check_catches_a_tensor_made_off_the_device() -> None:
    """The instrument itself: a CPU computation with one forgotten device fails it."""
    x = torch.ones(4)
    with pytest.raises(RuntimeError):
        with OnlyOnModelDevice():
            x + torch.arange(4)  # noqa: B018 - what attention.py did for a cached prefix's mask
    with OnlyOnModelDevice() as mode:
        torch.arange(4).mul_(2)  # a stray that meets nothing: the dispatch check sees it
    assert mode.strays and all("meta" in s for s in mode.strays)


def test_engine_with_chunking_prefix_hits_and_preemption_stays_on_device(moe_checkpoint: Path) -> None:
    """The whole engine (scheduler, runner, sampler) under the check: prompts longer than the
    token budget (later chunks), a shared prefix (cache hits) and a KV pool too small for all
    of them at once (preemption, resumed by recomputation)."""
    llm = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=8)
    shared = list(range(100, 112))
    prompts = [shared + [i, i + 1] for i in range(4)] + [list(range(200, 210))]
    params = [SAMPLED[i % len(SAMPLED)] for i in range(len(prompts))]
    params = [dataclasses.replace(p, max_tokens=12, ignore_eos=True) for p in params]
    with OnlyOnModelDevice() as mode:
        outs = llm.generate(prompts, params)
    assert not mode.strays, mode.strays[:5]
    assert all(len(o.token_ids) == 12 for o in outs)
    assert llm.core.shards[0].num_preemptions > 0
    assert any(o.num_cached_tokens for o in outs)
    llm.shutdown()


def test_device_side_expert_paths_stay_on_device() -> None:
    """The paths a GPU takes that a CPU does not choose: the grouped experts (counts and offsets
    made on the device) and FP8 experts (dequantized per matmul), under the check."""
    from cluster.config import ModelConfig
    from cluster.model.experts import LocalExperts, unsort_weighted_sum
    from cluster.model.fp8 import Fp8Experts

    raw = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    cfg = ModelConfig.from_dict(raw)
    local = LocalExperts(cfg)
    torch.nn.init.normal_(local.w_gate_up)
    torch.nn.init.normal_(local.w_down)
    fp8 = Fp8Experts(cfg, 4, "cpu")
    for w in (fp8.gate, fp8.up, fp8.down):
        w.q.copy_(torch.randn(w.q.shape))
        w.scale_inv.fill_(0.01)
    x, ids, weights = torch.randn(6, 32), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    rows, order = torch.randn(12, 32), torch.randperm(12)
    with torch.inference_mode(), OnlyOnModelDevice() as mode:
        a = local.forward_grouped(x, ids, weights)
        b = fp8(x, ids, weights)
        c = unsort_weighted_sum(rows, order, weights)
    assert mode.strays == [], mode.strays[:5]
    assert a.shape == b.shape == c.shape == x.shape and a.device == b.device == torch.device("cpu")
