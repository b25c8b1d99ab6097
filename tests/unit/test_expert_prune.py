"""Expert usage and pruning on a random checkpoint written by save_pretrained: the engine's
per-expert counts equal the experts transformers' router picks; a pruned checkpoint (single file
or sharded) keeps exactly the chosen experts' tensors and gate rows, and loads in this engine and
in transformers with identical greedy outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.config import ModelConfig
from cluster.model.checkpoint import tensor_index
from cluster.model.expert_usage import ExpertUsage, model_identity, most_used
from cluster.model.prune import prune_checkpoint
from tests.helpers.models import hf_greedy, hf_model, make_checkpoint

PROMPTS = [list(range(3, 40)), [7, 8, 9, 10, 11, 12], list(range(100, 160, 3))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _usage(path: Path, prompts=PROMPTS, params=GREEDY) -> ExpertUsage:
    llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4)
    try:
        llm.generate(prompts, params)
        return ExpertUsage.from_tensor(llm.expert_usage(), llm.core.model_config, model_identity(path), "test")
    finally:
        llm.shutdown()


def test_engine_usage_matches_transformers_router(moe_checkpoint: Path) -> None:
    """One prefill (max_tokens=1): the tokens each expert got, per layer, are the top-k of
    transformers' router logits on the same prompt; the summed weights are those top-k
    probabilities renormalised (norm_topk_prob)."""
    prompt = PROMPTS[0]
    usage = _usage(moe_checkpoint, [prompt], SamplingParams(max_tokens=1, temperature=0.0))
    ref = hf_model(moe_checkpoint)
    with torch.no_grad():
        out = ref(torch.tensor([prompt]), output_router_logits=True)
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    assert len(out.router_logits) == len(cfg.moe_layers) == len(usage.tokens)
    for i, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits.float().reshape(len(prompt), -1), dim=-1)
        w, ids = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        tokens = torch.bincount(ids.flatten(), minlength=cfg.num_experts).double()
        weight = torch.zeros(cfg.num_experts, dtype=torch.float64).index_add_(0, ids.flatten(), w.flatten().double())
        assert usage.tokens[i] == tokens.tolist()
        assert torch.allclose(torch.tensor(usage.weight[i], dtype=torch.float64), weight, atol=1e-4)


def test_usage_counts_exactly_in_a_bf16_model(moe_checkpoint: Path) -> None:
    """The counters stay float64 when the model is cast: in bf16 a count stopped at 256. Every
    token processed (prompt and decode, every layer) is counted top-k times."""
    prompts = [list(range(3, 500)), list(range(10, 500)), list(range(500, 20, -1))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(moe_checkpoint, dtype="bfloat16", num_kv_blocks=512, block_size=4)
    try:
        llm.generate(prompts, params)
        usage = llm.expert_usage()
        top_k = llm.core.model_config.num_experts_per_tok
        layers = llm.core.model_config.moe_layers
    finally:
        llm.shutdown()
    processed = sum(len(p) for p in prompts) + len(prompts) * (params.max_tokens - 1)  # the last token is not fed back
    assert usage.dtype == torch.float64
    assert usage[0, layers].sum(dim=-1).tolist() == [float(processed * top_k)] * len(layers)
    assert usage[0, layers].max() > 256


def test_usage_file_round_trip_and_model_check(moe_checkpoint: Path, tmp_path: Path) -> None:
    usage = _usage(moe_checkpoint)
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    # every layer sees the same tokens; each token goes to top-k experts with weights summing to 1
    totals = {sum(row) for row in usage.tokens}
    assert len(totals) == 1 and totals.pop() > 0
    for row_t, row_w in zip(usage.tokens, usage.weight):
        assert sum(row_t) == pytest.approx(cfg.num_experts_per_tok * sum(row_w))
    loaded = ExpertUsage.load(usage.save(tmp_path / "usage.json"))
    assert loaded == usage
    loaded.check_model(moe_checkpoint)
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="usage: measured on"):
        loaded.check_model(other)


def test_most_used_picks_the_top_per_layer() -> None:
    usage = ExpertUsage({}, [0, 2], 6, 2, tokens=[[5, 1, 9, 9, 0, 3], [0, 0, 0, 1, 2, 3]],
                        weight=[[0, 9, 0, 0, 0, 8], [3, 2, 1, 0, 0, 0]])
    assert most_used(usage, 3, "frequency") == {0: [0, 2, 3], 2: [3, 4, 5]}
    assert most_used(usage, 2, "weight") == {0: [1, 5], 2: [0, 1]}
    assert most_used(usage, 2, "frequency")[0] == [2, 3]   # a tie goes to the lower id
    with pytest.raises(ValueError, match="keep: 1 experts per layer"):
        most_used(usage, 1, "frequency")
    with pytest.raises(ValueError, match="by:"):
        most_used(usage, 3, "popularity")


def _prune_and_compare(src: Path, dst: Path) -> dict[int, list[int]]:
    usage = _usage(src)
    keep = most_used(usage, 4, "frequency")
    prune_checkpoint(src, dst, keep, record={"by": "frequency"})
    cfg = ModelConfig.from_pretrained(dst)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (4, 2)
    assert json.loads((dst / "pruning.json").read_text())["kept"] == {str(k): v for k, v in keep.items()}
    before, after = tensor_index(src), tensor_index(dst)
    assert not [n for n in after if ".mlp.experts.4." in n]
    from cluster.model.checkpoint import read_tensor

    def read(index, name):
        with open(index[name].file, "rb") as f:
            return read_tensor(f, index[name])

    for layer, ids in keep.items():
        gate = read(before, f"model.layers.{layer}.mlp.gate.weight")
        assert torch.equal(read(after, f"model.layers.{layer}.mlp.gate.weight"), gate[ids])
        for new, old in enumerate(ids):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(read(after, f"model.layers.{layer}.mlp.experts.{new}.{proj}.weight"),
                                   read(before, f"model.layers.{layer}.mlp.experts.{old}.{proj}.weight"))
    llm = LLM(dst, dtype="float32", num_kv_blocks=64, block_size=4)
    try:
        ours = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()
    ref = hf_model(dst)
    assert ours == [hf_greedy(ref, p, GREEDY.max_tokens) for p in PROMPTS]
    return keep


def test_pruned_checkpoint_loads_in_both_with_equal_greedy_outputs(moe_checkpoint: Path, tmp_path: Path) -> None:
    _prune_and_compare(moe_checkpoint, tmp_path / "pruned")
    assert (tmp_path / "pruned" / "generation_config.json").is_file()


def test_sharded_checkpoint_stays_sharded(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = make_checkpoint(tmp_path / "one")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    dst = tmp_path / "pruned"
    _prune_and_compare(sharded, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((dst / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(tensor_index(dst))


def test_prune_refuses_what_cannot_work(moe_checkpoint: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.from_pretrained(moe_checkpoint)
    layers = cfg.moe_layers
    with pytest.raises(ValueError, match="below top-k"):
        prune_checkpoint(moe_checkpoint, tmp_path / "a", {i: [0] for i in layers})
    with pytest.raises(ValueError, match="same number"):
        prune_checkpoint(moe_checkpoint, tmp_path / "b", {i: [0, 1, 2][: 2 + (i == layers[0])] for i in layers})
    with pytest.raises(ValueError, match="MoE layers"):
        prune_checkpoint(moe_checkpoint, tmp_path / "c", {layers[0]: [0, 1]})
    with pytest.raises(ValueError, match="distinct"):
        prune_checkpoint(moe_checkpoint, tmp_path / "d", {i: [1, 1] for i in layers})
    dense = make_checkpoint(tmp_path / "dense", dense=True)
    with pytest.raises(ValueError, match="dense"):
        prune_checkpoint(dense, tmp_path / "e", {})
