"""Shared fixtures: random-weight checkpoints written by transformers' save_pretrained (the hub's
key layout), with weights scaled up so that greedy argmaxes are well separated."""

from __future__ import annotations

import json
from pathlib import Path
import os
from typing import Any

import pytest
import torch

# The Triton kernels (cluster/kernels/gpu) run in Triton's interpreter where no GPU is present; it
# is read when a kernel is defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BASE_MOE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
    tie_word_embeddings=False, rope_theta=10000.0,
)


def make_checkpoint(path: Path, dense: bool = False, seed: int = 0, std: float = 0.15, **overrides: Any) -> Path:
    """Writes a random checkpoint with save_pretrained and returns its directory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    kwargs = {**BASE_MOE, **overrides}
    torch.manual_seed(seed)
    if dense:
        for k in ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob"):
            kwargs.pop(k, None)
        model = Qwen3ForCausalLM(Qwen3Config(**kwargs))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, std)
    model.eval().save_pretrained(path)
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt):].tolist()


def to_legacy_config(path: Path) -> None:
    """Rewrites config.json in the hub's older spelling (rope_theta + rope_scaling, num_experts)."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="session")
def qwen_vocab_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3's full vocabulary (so chat-template and think tokens are real ids), tiny otherwise;
    built once for the whole run (the serving tests and the engine's thinking-budget tests)."""
    return make_checkpoint(
        tmp_path_factory.mktemp("qwen-vocab"), vocab_size=151936, hidden_size=32, head_dim=8, num_hidden_layers=2,
        std=0.05, max_position_embeddings=1024,
    )
