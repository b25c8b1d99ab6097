"""Loading holds the model once: a fresh process that loads a ~1 GB bf16 checkpoint peaks at no
more than 1.25x the weights' bytes above where it started (the mapped, dict-of-tensors loader
before it peaked at 2.29x on a 1.2 GiB checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cluster.config import ModelConfig
from cluster.model.weights import attention_tensors, expert_tensors

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 32000, "hidden_size": 1024,
    "intermediate_size": 2048, "moe_intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

_PROBE = r"""
import json, sys, torch
from cluster.config import ModelConfig
from cluster.model.weights import load_model
path = sys.argv[1]
cfg = ModelConfig.from_pretrained(path)
before = int(open("/proc/self/statm").read().split()[1]) * 4096
model = load_model(path, cfg, torch.bfloat16, "cpu")
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork and survives exec
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "params": params}))
"""


def _write_checkpoint(path: Path) -> int:
    """A checkpoint with the hub's names and shapes (from the loader's own shape lists), split
    over two files; returns its bytes."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIG))
    cfg = ModelConfig.from_dict(CONFIG)
    shapes = attention_tensors(cfg)
    for layer in cfg.moe_layers:
        shapes.update(expert_tensors(cfg, layer, range(cfg.num_experts)))
    names = sorted(shapes)
    weight_map, total = {}, 0
    for part, chunk in enumerate((names[::2], names[1::2])):
        fname = f"model-{part + 1:05d}-of-00002.safetensors"
        tensors = {n: torch.full(shapes[n], 0.01, dtype=torch.bfloat16) for n in chunk}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, path / fname)
        weight_map.update({n: fname for n in chunk})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def test_load_peak_memory_is_close_to_the_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "big"
    weight_bytes = _write_checkpoint(ckpt)
    assert 0.9e9 < weight_bytes < 1.3e9
    env = {**os.environ, "Q3SERVE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ckpt)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(m["params"] - weight_bytes) < 1e-3 * weight_bytes  # qk-norm rows are repeated per head
    ratio = (m["peak"] - m["before"]) / weight_bytes
    print(f"load peak: {ratio:.3f}x the weights' {weight_bytes / 2**30:.2f} GiB")
    assert ratio <= 1.25, f"loading peaked at {ratio:.2f}x the weights' bytes ({m})"
