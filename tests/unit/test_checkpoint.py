"""Checkpoint loading: single file or sharded index, loading only the tensors asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, SamplingParams
from cluster.model.checkpoint import load_tensors
from cluster.config import ModelConfig
from cluster.model.weights import attention_tensors, expert_tensors
from tests.helpers.models import hf_greedy, hf_model, make_checkpoint


def _shard(path: Path, parts: int = 3) -> None:
    """Rewrites model.safetensors as a sharded checkpoint with an index, as the hub has it."""
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, path / fname)
        weight_map.update({n: fname for n in chunk})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_generates_like_transformers(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m")
    _shard(path)
    llm = LLM(path, dtype="float32", num_kv_blocks=64)
    out = llm.generate([[4, 8, 15, 16, 23, 42]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf_model(path), [4, 8, 15, 16, 23, 42], 10)
    llm.shutdown()


def test_filter_loads_only_owned_tensors(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m")
    _shard(path)
    cfg = ModelConfig.from_pretrained(path)
    experts = expert_tensors(cfg, 1, [2, 5])
    got = load_tensors(path, experts, dtype=torch.bfloat16)
    assert set(got) == set(experts) and len(got) == 6
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    attn = load_tensors(path, attention_tensors(cfg))
    assert not any(".experts." in n for n in attn)
    assert "model.layers.2.mlp.gate.weight" in attn


def test_progress_bar_shown_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_checkpoint(tmp_path / "m", num_hidden_layers=1)
    cfg = ModelConfig.from_pretrained(path)
    load_tensors(path, attention_tensors(cfg), progress=True)
    assert "Loading weights" in capsys.readouterr().err
