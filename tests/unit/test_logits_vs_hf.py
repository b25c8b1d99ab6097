"""Engine logits equal transformers' on the same checkpoint, prefill and every decode step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import EngineConfig, SamplingParams
from cluster.engine.core import EngineCore
from tests.helpers.models import hf_model, make_checkpoint, to_legacy_config
from tests.helpers.runner import LogitsTap

CONFIGS = {
    "gqa2-e8-top2-norm": dict(),
    "hd32-mqa-e16-top4-nonorm-tied": dict(
        head_dim=32, num_attention_heads=8, num_key_value_heads=1, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=False, tie_word_embeddings=True,
    ),
    "hd8-mha-e5-top3": dict(head_dim=8, num_attention_heads=4, num_key_value_heads=4, num_experts=5, num_experts_per_tok=3),
    "yarn": dict(
        max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
    ),
    "dense-layers": dict(num_hidden_layers=4, mlp_only_layers=[0, 3]),
    "sparse-step-2": dict(num_hidden_layers=4, decoder_sparse_step=2),
    "dense-qwen3": dict(dense=True, tie_word_embeddings=True),
    "dense-qwen3-bias": dict(dense=True, attention_bias=True),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# The hub's older config.json spelling (rope_theta + rope_scaling, num_experts) for the configs
# whose rope and expert-count keys it changes.
CASES = [(name, False) for name in CONFIGS] + [("yarn", True), ("gqa2-e8-top2-norm", True)]


@pytest.mark.parametrize(("name", "legacy"), CASES, ids=[f"{n}{'-legacy' if l else ''}" for n, l in CASES])
def test_logits_match_transformers(tmp_path: Path, name: str, legacy: bool) -> None:
    overrides = dict(CONFIGS[name])
    dense = overrides.pop("dense", False)
    path = make_checkpoint(tmp_path / name, dense=dense, **overrides)
    if legacy:
        to_legacy_config(path)
    ref_model = hf_model(path)
    core = EngineCore(path, dtype="float32", config=EngineConfig(block_size=8, num_kv_blocks=64))
    if name == "yarn":  # YaRN only differs past the original context: go beyond it
        prompt = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    else:
        prompt = [3, 17, 99, 250, 11, 7, 401, 5, 88]
    steps = 12
    core.add_request(prompt, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
    tap = LogitsTap(core.runner)
    ours: list[torch.Tensor] = []
    tokens: list[int] = []
    while core.has_work():
        outs = core.step()
        ours.append(tap.last[0].clone())
        tokens.extend(outs[0].delta_token_ids)
    assert len(ours) == steps
    with torch.no_grad():
        ref = ref_model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert _rel_err(a, b) < 1e-4, f"{name}: step {step} logits differ (rel {_rel_err(a, b):.2e})"
    assert tokens == ref.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["gqa2-e8-top2-norm", "hd32-mqa-e16-top4-nonorm-tied"])
def test_logits_match_transformers_without_native_kernels(tmp_path: Path, monkeypatch, name: str) -> None:
    """The PyTorch twins of the native kernels (decode attention, experts) stay exact too."""
    monkeypatch.setenv("Q3SERVE_NATIVE", "0")
    test_logits_match_transformers(tmp_path, name, False)
