"""Maps the hub's tensor names onto the engine's fused parameters (q/k/v into one projection,
gate/up into one, per-expert tensors into per-layer stacks), and says which tensors a part of
the model needs, so that each actor loads only its own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from cluster import native
from cluster.model.checkpoint import load_tensors
from cluster.config import ModelConfig
from cluster.model.experts import LocalExperts
from cluster.model.qwen3_moe import DenseMlp, Qwen3MoeModel, SparseMoe

Shape = tuple[int, ...]


def attention_tensors(cfg: ModelConfig) -> dict[str, Shape]:
    """Everything but the routed experts: embeddings, attention, gates, dense MLPs, norms, head."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out: dict[str, Shape] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[p + f"self_attn.{name}.weight"] = (rows, h)
            if cfg.attention_bias:
                out[p + f"self_attn.{name}.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.attention_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "self_attn.q_norm.weight"] = (hd,)
        out[p + "self_attn.k_norm.weight"] = (hd,)
        if cfg.is_moe_layer(i):
            out[p + "mlp.gate.weight"] = (cfg.num_experts, h)
        else:
            for name in ("gate_proj", "up_proj"):
                out[p + f"mlp.{name}.weight"] = (cfg.intermediate_size, h)
            out[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    return out


def expert_tensors(cfg: ModelConfig, layer: int, experts: Iterable[int]) -> dict[str, Shape]:
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    out: dict[str, Shape] = {}
    for e in experts:
        p = f"model.layers.{layer}.mlp.experts.{e}."
        out[p + "gate_proj.weight"] = (i, h)
        out[p + "up_proj.weight"] = (i, h)
        out[p + "down_proj.weight"] = (h, i)
    return out


def stack_experts(
    t: Mapping[str, torch.Tensor], layer: int, experts: Iterable[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert hub tensors -> (w_gate_up [E, H, 2I], w_down [E, I, H]) in the order given:
    input-major (the hub's matrices transposed), so that rows @ weights is a plain matmul, the
    layout both MKL and the native kernel stream fastest."""
    gate_up, down = [], []
    for e in experts:
        p = f"model.layers.{layer}.mlp.experts.{e}."
        gate_up.append(torch.cat([t[p + "gate_proj.weight"], t[p + "up_proj.weight"]], dim=0).t())
        down.append(t[p + "down_proj.weight"].t())
    return torch.stack(gate_up), torch.stack(down)


def load_attention_weights(model: Qwen3MoeModel, t: Mapping[str, torch.Tensor]) -> None:
    """Copies the non-expert tensors into the model's (fused) parameters."""
    cfg = model.cfg
    with torch.no_grad():
        model.embed_tokens.weight.copy_(t["model.embed_tokens.weight"])
        model.norm.weight.copy_(t["model.norm.weight"])
        if model.lm_head is not None:
            model.lm_head.load(t["lm_head.weight"])
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.input_layernorm.weight.copy_(t[p + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(t[p + "post_attention_layernorm.weight"])
            attn = layer.self_attn
            qkv = [p + f"self_attn.{n}_proj." for n in "qkv"]
            bias = cfg.attention_bias
            attn.qkv_proj.load(torch.cat([t[n + "weight"] for n in qkv]), torch.cat([t[n + "bias"] for n in qkv]) if bias else None)
            attn.o_proj.load(t[p + "self_attn.o_proj.weight"], t[p + "self_attn.o_proj.bias"] if bias else None)
            h = cfg.num_attention_heads
            attn.qk_norm[:h] = t[p + "self_attn.q_norm.weight"]
            attn.qk_norm[h:] = t[p + "self_attn.k_norm.weight"]
            if isinstance(layer.mlp, SparseMoe):
                layer.mlp.gate.load(t[p + "mlp.gate.weight"])
            elif isinstance(layer.mlp, DenseMlp):
                layer.mlp.gate_up_proj.load(torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]))
                layer.mlp.down_proj.load(t[p + "mlp.down_proj.weight"])


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: str, experts=None) -> Qwen3MoeModel:  # noqa: ANN001
    """A model with uninitialised weights (allocated once, on the target device). On CPU the
    native kernels are built (or loaded from the build cache) here, at startup, so that the
    first step does not pay for a compile under its step timeout."""
    native.prepare(device)
    with torch.device("meta"):
        model = Qwen3MoeModel(cfg, experts)
    model = model.to_empty(device=device).to(dtype)
    for m in model.modules():
        if isinstance(m, SparseMoe):
            m.expert_counts.zero_()
    return model


def load_model(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu") -> Qwen3MoeModel:
    """The whole model in this process: attention weights plus every layer's local experts."""
    expected = attention_tensors(cfg)
    for layer in cfg.moe_layers:
        expected.update(expert_tensors(cfg, layer, range(cfg.num_experts)))
    t = load_tensors(path, expected, dtype=dtype, device=device)
    model = empty_model(cfg, dtype, device)
    load_attention_weights(model, t)
    with torch.no_grad():
        for i in cfg.moe_layers:
            experts = model.layers[i].mlp.experts
            assert isinstance(experts, LocalExperts)
            gu, dn = stack_experts(t, i, range(cfg.num_experts))
            experts.w_gate_up.copy_(gu)
            experts.w_down.copy_(dn)
    return model.eval().requires_grad_(False)


def load_attention_model(
    path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str, experts
) -> Qwen3MoeModel:  # noqa: ANN001
    """An attention shard's model: everything but the routed experts, which `experts(layer)`
    supplies (a dispatcher). Reads no expert tensor."""
    t = load_tensors(path, attention_tensors(cfg), dtype=dtype, device=device)
    model = empty_model(cfg, dtype, device, experts)
    load_attention_weights(model, t)
    return model.eval().requires_grad_(False)
