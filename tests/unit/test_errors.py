"""Bad input gets a clear exception naming what is wrong; nothing hangs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cluster import LLM, SamplingParams
from cluster.model.checkpoint import CheckpointError
from cluster.config import ConfigError, ModelConfig
from tests.helpers.models import make_checkpoint


def test_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        LLM(tmp_path)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path)


def test_missing_tensor(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", num_hidden_layers=1)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.3\.up_proj\.weight"):
        LLM(path, dtype="float32", num_kv_blocks=8)


def test_misshaped_tensor(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", num_hidden_layers=1)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1].clone()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"self_attn\.k_proj\.weight.*shape \[31, 64\], expected \[32, 64\]"):
        LLM(path, dtype="float32", num_kv_blocks=8)


def test_no_weights_file(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", num_hidden_layers=1)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LLM(path, dtype="float32", num_kv_blocks=8)


@pytest.fixture(scope="module")
def llm(moe_checkpoint: Path):
    llm = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=16, block_size=4, max_model_len=48)
    yield llm
    llm.shutdown()


def test_prompt_longer_than_max_model_len(llm: LLM) -> None:
    with pytest.raises(ValueError, match="max_model_len=48"):
        llm.generate([list(range(60))])
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=2))[0].token_ids  # still serving


def test_generation_capped_at_max_model_len(llm: LLM) -> None:
    out = llm.generate([list(range(40))], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
     ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"stop": [""]}, "stop")],
)
def test_bad_sampling_params(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="token id 9999"):
        llm.generate([[1, 9999]])


def test_bad_engine_options(moe_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        LLM(moe_checkpoint, dtype="float8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(moe_checkpoint, num_kv_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(TypeError, match="no_such_option"):
        LLM(moe_checkpoint, no_such_option=1)
    with pytest.raises(ValueError, match="block_size"):
        LLM(moe_checkpoint, block_size=0)
