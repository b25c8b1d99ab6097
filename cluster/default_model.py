"""The embedded default model until a trained one lands: a small random-weight Qwen3-MoE
checkpoint with Qwen3's real vocabulary, generated deterministically on first use into a cache
directory (hub key layout, bf16). Its text is noise; it exists so that everything runs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

NAME = "q3serve-random-moe-v1"
CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
GENERATION_CONFIG = {"eos_token_id": [151645, 151643], "pad_token_id": 151643}


def cache_dir() -> Path:
    return Path(os.environ.get("Q3SERVE_CACHE", Path.home() / ".cache" / "q3serve"))


def random_weights(config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Hub-layout tensors drawn from N(0, 0.02) (norms at 1) by a seeded generator."""
    from cluster.config import ModelConfig
    from cluster.weights import attention_tensors, expert_tensors

    cfg = ModelConfig.from_dict(config)
    shapes = attention_tensors(cfg)
    for layer in cfg.moe_layers:
        shapes.update(expert_tensors(cfg, layer, range(cfg.num_experts)))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shapes[name], dtype=dtype)
        else:
            out[name] = (torch.randn(shapes[name], generator=g) * 0.02).to(dtype)
    return out


def default_model_path() -> Path:
    """Creates the checkpoint on first use (atomically, so concurrent first uses are safe)."""
    target = cache_dir() / "models" / NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{NAME}-"))
    try:
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
        save_file(random_weights(CONFIG), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
