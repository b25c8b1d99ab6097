"""Tiny checkpoints for tests: random weights written by transformers' save_pretrained (the hub's
key layout), scaled up so that greedy argmaxes are well separated, and transformers' own model
and greedy decoding as the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

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


def make_qwen_vocab_checkpoint(path: Path, std: float = 0.05) -> Path:
    """Qwen3's full vocabulary (so chat-template and think tokens are real ids), tiny otherwise."""
    return make_checkpoint(path, vocab_size=151936, hidden_size=32, head_dim=8, num_hidden_layers=2, std=std,
                           max_position_embeddings=1024)


def make_thinker_checkpoint(path: Path) -> Path:
    """A tiny Qwen-vocabulary model whose greedy choice is always `<think>`: every embedding has
    a large constant in dimension 0, the final norm keeps only that dimension, and in lm_head only
    `<think>` has a positive weight on it. So with thinking on it opens <think> and never closes
    it by itself: what closes it is the thinking budget."""
    from safetensors.torch import load_file, save_file

    from cluster.engine.tokenizer import THINK_START

    make_qwen_vocab_checkpoint(path, std=0.02)
    t = load_file(path / "model.safetensors")
    t["model.embed_tokens.weight"][:, 0] = 50.0
    t["model.norm.weight"] = torch.zeros_like(t["model.norm.weight"])
    t["model.norm.weight"][0] = 1.0
    t["lm_head.weight"][:, 0] = -1.0
    t["lm_head.weight"][THINK_START, 0] = 1.0
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    return path


def hf_model(path: Path):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:  # noqa: ANN001
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


# FP8 checkpoints in Qwen's layout (e4m3 weights, a float32 weight_scale_inv per block).

E4M3_MAX = 448.0


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax scaling, as Qwen's FP8 checkpoints are made: q = w / s in e4m3, s stored."""
    rows, cols = w.shape
    br, bc = block
    scale = torch.empty(math.ceil(rows / br), math.ceil(cols / bc), dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].double()
            s = float(blk.abs().max()) / E4M3_MAX or 1.0
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / scale[i, j].double()).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_loop(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference dequantization: q * s block by block, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    br, bc = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = q[i * br:(i + 1) * br, j * bc:(j + 1) * bc].double() * float(scale[i, j])
    return out


def fp8_quantized(name: str) -> bool:
    """What Qwen's FP8 checkpoints quantize: every projection of attention, experts and dense
    MLPs; not embeddings, head, norms or the router gate."""
    return name.endswith("proj.weight")


def fp8_pair(root: Path, block: tuple[int, int], **overrides) -> tuple[Path, Path]:  # noqa: ANN003
    """A random model written as an FP8 checkpoint in Qwen's layout, and its dequantized float32 twin."""
    from safetensors.torch import load_file, save_file

    src = make_checkpoint(root / "src", **overrides)
    tensors = load_file(src / "model.safetensors")
    fp8, twin = {}, {}
    for name, t in tensors.items():
        if fp8_quantized(name):
            q, s = quantize_blocks(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            twin[name] = dequantize_loop(q, s, block).float()
        else:
            fp8[name] = twin[name] = t
    cfg = json.loads((src / "config.json").read_text())
    paths = []
    for kind, tensors_out, extra in (("fp8", fp8, {"quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}}),
            ("twin", twin, {})):
        d = root / kind
        d.mkdir()
        save_file(tensors_out, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        paths.append(d)
    return paths[0], paths[1]
