"""The expert-parallel instance (attention shards + expert groups on Ray, gloo all_to_all), in
the separate and the colocated layout, generates exactly what the single-process engine does,
holds only its share of the weights, and moves exactly the expected bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from cluster import LLM, SamplingParams
from cluster.config import ModelConfig
from cluster.engine.core import EngineCore, RequestOutput
from cluster.parallel.placement import load_balanced
from cluster.model.weights import attention_tensors
from tests.helpers.expert_parallel import GREEDY, PROMPTS, expert_bytes
from tests.helpers.models import fp8_pair, hf_greedy, hf_model

ENGINE = dict(dtype="float32", num_kv_blocks=16, block_size=4, max_num_batched_tokens=16, max_model_len=64)

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _staggered(core: EngineCore) -> list[list[int]]:
    """Prompts arrive over several steps, with chunked prefill and a pool tight enough that
    sequences are preempted; returns each prompt's tokens."""
    done: dict[str, RequestOutput] = {}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or core.has_work():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            core.add_request(p, GREEDY, request_id=str(i))
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 500
    return [done[str(i)].token_ids for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def reference(moe_checkpoint: Path) -> list[list[int]]:
    ref = hf_model(moe_checkpoint)
    return [hf_greedy(ref, p, GREEDY.max_tokens) for p in PROMPTS]


@pytest.mark.parametrize(("shards", "groups", "layout"),
                         [(1, 2, "separate"), (2, 2, "separate"), (2, 3, "separate"), (2, 2, "colocated")])
def test_token_equality(moe_checkpoint: Path, reference: list[list[int]], shards: int, groups: int, layout: str) -> None:
    llm = LLM(moe_checkpoint, attention_shards=shards, expert_groups=groups, layout=layout, **ENGINE)
    try:
        assert _staggered(llm.core) == reference
        assert len(llm.core.executor.actors) == (shards if layout == "colocated" else shards + groups)
        if shards == 1:  # one shard's pool is too small for all five: sequences were preempted
            assert llm.core.scheduler.num_preemptions > 0
        assert all(s.blocks.cached for s in llm.core.shards), "every attention shard held sequences"
    finally:
        llm.shutdown()


def test_load_balanced_placement_with_redundant_experts(moe_checkpoint: Path, reference: list[list[int]]) -> None:
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    probe = LLM(moe_checkpoint, **ENGINE)
    probe.generate(PROMPTS, GREEDY)
    counts = probe.expert_usage()[0][cfg.moe_layers]
    probe.shutdown()
    placement = load_balanced(counts, num_groups=2, redundant=2)
    assert any(len(r) > 1 for layer in range(placement.num_layers) for r in placement.replicas(layer))
    llm = LLM(moe_checkpoint, attention_shards=2, expert_groups=2, placement=placement, **ENGINE)
    try:
        assert _staggered(llm.core) == reference
        held = llm.core.executor.call_all("param_bytes", actors=llm.core.executor.groups)
        assert held == [5 * expert_bytes(cfg)] * 2  # 8 experts + 2 copies over 2 groups
    finally:
        llm.shutdown()


def test_actors_hold_only_their_share(moe_checkpoint: Path) -> None:
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    llm = LLM(moe_checkpoint, attention_shards=2, expert_groups=3, **ENGINE)
    try:
        ex = llm.core.executor
        shard_bytes = ex.call_all("param_bytes", actors=ex.shards)
        group_bytes = ex.call_all("param_bytes", actors=ex.groups)
        attn = sum(torch.Size(s).numel() * 4 for s in attention_tensors(cfg).values())
        # q_norm and k_norm are held repeated per head, one [heads + kv_heads, head_dim] weight per layer
        heads = cfg.num_attention_heads + cfg.num_key_value_heads
        attn += cfg.num_hidden_layers * (heads - 2) * cfg.head_dim * 4
        assert shard_bytes == [attn, attn]
        assert group_bytes == [3 * expert_bytes(cfg), 2 * expert_bytes(cfg), 3 * expert_bytes(cfg)]  # 8 experts as 3 + 2 + 3
    finally:
        llm.shutdown()


def test_colocated_ranks_hold_attention_and_their_experts_and_serve_each_other(moe_checkpoint: Path) -> None:
    """Two actors, each an attention shard and an expert group: each holds the attention weights
    and half the experts, and the rows one shard sent are the rows the two ranks served."""
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    llm = LLM(moe_checkpoint, attention_shards=2, expert_groups=2, layout="colocated", **ENGINE)
    try:
        ex = llm.core.executor
        assert ex.groups == [] and len(ex.shards) == 2
        attn = sum(torch.Size(s).numel() * 4 for s in attention_tensors(cfg).values())
        heads = cfg.num_attention_heads + cfg.num_key_value_heads
        attn += cfg.num_hidden_layers * (heads - 2) * cfg.head_dim * 4
        assert ex.call_all("param_bytes") == [attn + 4 * expert_bytes(cfg)] * 2
        ex.call_all("exchange_stats", True)
        prompt = list(range(30, 43))  # one request: it lands on one shard, whose rows go to both ranks
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
        stats = ex.call_all("exchange_stats")
        rows = len(prompt) * cfg.num_experts_per_tok
        # every row is counted once by its sender and once by its server (a row to itself twice)
        total = [sum(col) for col in zip(*(s["hidden_bytes"] for s in stats))]
        assert total == [2 * 2 * rows * cfg.hidden_size * 4] * len(cfg.moe_layers)
        assert all(sum(s["hidden_bytes"]) > 0 for s in stats), "both ranks served experts"
    finally:
        llm.shutdown()


def test_fp8_experts_kept_across_colocated_ranks(tmp_path: Path) -> None:
    """An FP8 checkpoint with fp8_weights="keep" in a colocated 2 x 2 instance: each rank holds
    its experts as e4m3 values and block scales (a quarter of float32's bytes plus the scales),
    serves them through the exchange, and the instance generates what the dequantized twin does
    in one process."""
    block = (16, 16)
    fp8, twin = fp8_pair(tmp_path, block)
    cfg = ModelConfig.from_pretrained(fp8)
    ref = LLM(twin, **ENGINE)
    want = [o.token_ids for o in ref.generate(PROMPTS, GREEDY)]
    ref.shutdown()
    llm = LLM(fp8, attention_shards=2, expert_groups=2, layout="colocated", fp8_weights="keep", **ENGINE)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        scales = (2 * -(-i // 16) * -(-h // 16) + -(-h // 16) * -(-i // 16)) * 4
        per_expert = (3 * h * i + scales) * len(cfg.moe_layers)
        attn = sum(torch.Size(s).numel() * 4 for s in attention_tensors(cfg).values())
        heads = cfg.num_attention_heads + cfg.num_key_value_heads
        attn += cfg.num_hidden_layers * (heads - 2) * cfg.head_dim * 4
        assert llm.core.executor.call_all("param_bytes") == [attn + 4 * per_expert] * 2
    finally:
        llm.shutdown()


def test_bytes_per_layer_match_routing(moe_checkpoint: Path) -> None:
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    llm = LLM(moe_checkpoint, attention_shards=1, expert_groups=2, **ENGINE)
    try:
        ex = llm.core.executor
        ex.call_all("exchange_stats", True)
        prompt = list(range(30, 43))  # one step: 13 tokens, each to top-k experts
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
        (stats,) = ex.call_all("exchange_stats", actors=ex.shards)
        hidden, index = stats["hidden_bytes"], stats["index_bytes"]
        rows = len(prompt) * cfg.num_experts_per_tok
        world = 3
        assert hidden == [2 * rows * cfg.hidden_size * 4] * len(cfg.moe_layers)
        assert index == [rows * 8 + 2 * world * 8] * len(cfg.moe_layers)
        group_hidden = [g["hidden_bytes"] for g in ex.call_all("exchange_stats", actors=ex.groups)]
        assert [sum(col) for col in zip(*group_hidden)] == hidden  # every row went to exactly one group
        counts = llm.expert_usage()[0][cfg.moe_layers]
        assert counts.sum(1).tolist() == [rows] * len(cfg.moe_layers)
    finally:
        llm.shutdown()


def test_dense_model_cannot_be_expert_parallel(tmp_path: Path) -> None:
    from tests.helpers.models import make_checkpoint

    path = make_checkpoint(tmp_path / "dense", dense=True, num_hidden_layers=1)
    with pytest.raises(ValueError, match="expert_groups"):
        LLM(path, expert_groups=2, dtype="float32", num_kv_blocks=8)


def _actor_processes() -> list[str]:
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray::AttentionShard" in cmd or "ray::ExpertGroup" in cmd:
            out.append(cmd)
    return out


def test_shutdown_leaves_no_actor(moe_checkpoint: Path) -> None:
    import time

    llm = LLM(moe_checkpoint, attention_shards=1, expert_groups=2, **ENGINE)
    llm.generate([[1, 2, 3]], GREEDY)
    assert len([n for n in ray.util.list_named_actors() if "q3serve" in n]) == 3
    assert len(_actor_processes()) == 3
    llm.shutdown()
    deadline = time.monotonic() + 20
    while _actor_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _actor_processes() == []
    assert [n for n in ray.util.list_named_actors() if "q3serve" in n] == []
