"""Maps the hub's tensor names onto the engine's fused parameters (q/k/v into one projection,
gate/up into one, per-expert tensors into per-layer stacks), and says which tensors a part of
the model needs, so that each actor loads only its own. Parameters are allocated once, in the
serving dtype, on their device; each checkpoint tensor is copied into its slice as it is read.
An FP8 checkpoint's routed experts may be kept in FP8 instead (`Fp8Experts`, see fp8.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from cluster import native
from cluster.model.checkpoint import Shape, iter_tensors
from cluster.config import ModelConfig
from cluster.model.experts import LocalExperts
from cluster.model.fp8 import Fp8Experts, keeps_fp8
from cluster.model.qwen3_moe import DenseMlp, Qwen3MoeModel, SparseMoe


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


Fill = Callable[[torch.Tensor], None]


def _into(dst: torch.Tensor, transpose: bool = False) -> Fill:
    """Copies a checkpoint tensor into `dst` (a parameter or a slice of one), transposed into
    the input-major layout when asked; `copy_` converts dtype and device on the way."""
    def fill(t: torch.Tensor) -> None:
        dst.copy_(t.t() if transpose else t)
    return fill


def _each(*fills: Fill) -> Fill:
    def fill(t: torch.Tensor) -> None:
        for f in fills:
            f(t)
    return fill


def expert_fills(
    cfg: ModelConfig, layer: int, slots: Sequence[int], w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> dict[str, Fill]:
    """Where each hub tensor of a layer's experts goes: expert `slots[s]` fills slot s of the
    input-major stacks (w_gate_up [S, H, 2I] gate then up, w_down [S, I, H]); an expert held in
    several slots (redundant copies) fills each."""
    i = cfg.moe_intermediate_size
    by_expert: dict[int, list[int]] = {}
    for s, e in enumerate(slots):
        by_expert.setdefault(e, []).append(s)
    out: dict[str, Fill] = {}
    for e, mine in by_expert.items():
        p = f"model.layers.{layer}.mlp.experts.{e}."
        out[p + "gate_proj.weight"] = _each(*(_into(w_gate_up[s, :, :i], True) for s in mine))
        out[p + "up_proj.weight"] = _each(*(_into(w_gate_up[s, :, i:], True) for s in mine))
        out[p + "down_proj.weight"] = _each(*(_into(w_down[s], True) for s in mine))
    return out


def attention_fills(model: Qwen3MoeModel) -> dict[str, Fill]:
    """Where each non-expert hub tensor goes in the model's (fused, input-major) parameters."""
    cfg = model.cfg
    h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out: dict[str, Fill] = {"model.embed_tokens.weight": _into(model.embed_tokens.weight),
                            "model.norm.weight": _into(model.norm.weight)}
    if model.lm_head is not None:
        out["lm_head.weight"] = _into(model.lm_head.weight_t, True)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = _into(layer.input_layernorm.weight)
        out[p + "post_attention_layernorm.weight"] = _into(layer.post_attention_layernorm.weight)
        attn = layer.self_attn
        bounds = {"q": (0, h * hd), "k": (h * hd, (h + kvh) * hd), "v": ((h + kvh) * hd, (h + 2 * kvh) * hd)}
        for n, (a, b) in bounds.items():
            out[p + f"self_attn.{n}_proj.weight"] = _into(attn.qkv_proj.weight_t[:, a:b], True)
            if attn.qkv_proj.bias is not None:
                out[p + f"self_attn.{n}_proj.bias"] = _into(attn.qkv_proj.bias[a:b])
        out[p + "self_attn.o_proj.weight"] = _into(attn.o_proj.weight_t, True)
        if attn.o_proj.bias is not None:
            out[p + "self_attn.o_proj.bias"] = _into(attn.o_proj.bias)
        out[p + "self_attn.q_norm.weight"] = _into(attn.qk_norm[:h])  # one row per q head, broadcast
        out[p + "self_attn.k_norm.weight"] = _into(attn.qk_norm[h:])
        if isinstance(layer.mlp, SparseMoe):
            out[p + "mlp.gate.weight"] = _into(layer.mlp.gate.weight_t, True)
        elif isinstance(layer.mlp, DenseMlp):
            inter = cfg.intermediate_size
            out[p + "mlp.gate_proj.weight"] = _into(layer.mlp.gate_up_proj.weight_t[:, :inter], True)
            out[p + "mlp.up_proj.weight"] = _into(layer.mlp.gate_up_proj.weight_t[:, inter:], True)
            out[p + "mlp.down_proj.weight"] = _into(layer.mlp.down_proj.weight_t, True)
    return out


def fill_from_checkpoint(path: str | Path, cfg: ModelConfig, expected: dict[str, Shape],
                         fills: dict[str, Fill], dtype: torch.dtype, keep_fp8: frozenset[str] = frozenset()) -> None:
    """Reads each tensor of `expected` once and copies it where `fills` says, so that the host
    holds one checkpoint tensor at a time and the device only the parameters (plus one tensor).
    Tensors named in `keep_fp8` reach their fill as FP8 values with their scales."""
    assert expected.keys() == fills.keys(), sorted(expected.keys() ^ fills.keys())[:3]
    with torch.no_grad():
        for name, t in iter_tensors(path, expected, cfg.fp8_block, dtype, keep_fp8=keep_fp8):
            fills[name](t)  # type: ignore[arg-type]


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: str, experts=None) -> Qwen3MoeModel:  # noqa: ANN001
    """A model with uninitialised weights, allocated once, in `dtype`, on the target device (the
    cast happens on the meta device, so no float32 copy is ever made). On CPU the native kernels
    are built (or loaded from the build cache) here, at startup, so that the first step does not
    pay for a compile under its step timeout."""
    native.prepare(device)
    with torch.device("meta"):
        model = Qwen3MoeModel(cfg, experts).to(dtype)
    model = model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, SparseMoe):
            m.usage.zero_()
    return model


def load_model(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu") -> Qwen3MoeModel:
    """The whole model in this process: attention weights plus every layer's local experts
    (in FP8 where `keeps_fp8` says so)."""
    fp8 = {i: Fp8Experts(cfg, cfg.num_experts, device) for i in cfg.moe_layers} if keeps_fp8(cfg, cfg.fp8_weights) else {}
    model = empty_model(cfg, dtype, device, fp8.__getitem__ if fp8 else None)
    expected, fills = attention_tensors(cfg), attention_fills(model)
    for i in cfg.moe_layers:
        expected.update(expert_tensors(cfg, i, range(cfg.num_experts)))
        if fp8:
            fills.update(fp8[i].fills(cfg, i, range(cfg.num_experts)))
            continue
        experts = model.layers[i].mlp.experts
        assert isinstance(experts, LocalExperts)
        fills.update(expert_fills(cfg, i, range(cfg.num_experts), experts.w_gate_up, experts.w_down))
    keep = frozenset(n for n in expected if ".mlp.experts." in n) if fp8 else frozenset()
    fill_from_checkpoint(path, cfg, expected, fills, dtype, keep)
    return model.eval().requires_grad_(False)


def load_attention_model(
    path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str, experts
) -> Qwen3MoeModel:  # noqa: ANN001
    """An attention shard's model: everything but the routed experts, which `experts(layer)`
    supplies (a dispatcher). Reads no expert tensor."""
    model = empty_model(cfg, dtype, device, experts)
    fill_from_checkpoint(path, cfg, attention_tensors(cfg), attention_fills(model), dtype)
    return model.eval().requires_grad_(False)


ExpertStack = tuple[torch.Tensor, torch.Tensor] | Fp8Experts


def load_expert_stacks(
    path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str, slots: Sequence[Sequence[int]],
    ordinals: Sequence[int] | None = None,
) -> list[ExpertStack]:
    """An expert group's weights: for each MoE layer (in order; or only the MoE layer ordinals in
    `ordinals`) the experts in `slots[ordinal]`, allocated once and filled as the checkpoint is
    read: input-major (w_gate_up, w_down) stacks in the serving dtype, or an `Fp8Experts` where
    `keeps_fp8` says so."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    fp8 = keeps_fp8(cfg, cfg.fp8_weights)
    stacks: list[ExpertStack] = []
    expected: dict[str, Shape] = {}
    fills: dict[str, Fill] = {}
    for ordinal, layer in enumerate(cfg.moe_layers):
        if ordinals is not None and ordinal not in ordinals:
            continue
        mine = list(slots[ordinal])
        expected.update(expert_tensors(cfg, layer, sorted(set(mine))))
        if fp8:
            stack = Fp8Experts(cfg, len(mine), device)
            fills.update(stack.fills(cfg, layer, mine))  # type: ignore[arg-type]
            stacks.append(stack)
            continue
        gu = torch.empty(len(mine), h, 2 * i, dtype=dtype, device=device)
        dn = torch.empty(len(mine), i, h, dtype=dtype, device=device)
        stacks.append((gu, dn))
        fills.update(expert_fills(cfg, layer, mine, gu, dn))
    fill_from_checkpoint(path, cfg, expected, fills, dtype, frozenset(expected) if fp8 else frozenset())
    return stacks
