"""A trainable Qwen3-MoE (the architecture of `Qwen3MoeForCausalLM`, tied embeddings) over a
compact vocabulary: the tokens the task data uses plus one shared row that stands for every other
token of Qwen3's 151,936. `export` writes it in the hub's key layout at the full vocabulary, every
unused row a copy of the shared one.

Why the shared row: Qwen3's output layer is ~97% of the FLOPs of a model this small. With all
unused rows equal, the full-vocabulary softmax is exactly the compact one with the shared row's
logit raised by log(number of unused rows), so training on the compact vocabulary optimises the
real loss, including pushing the total probability of unused tokens down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cluster.config import ModelConfig
from cluster.model.experts import sort_by_expert
from cluster.model.layers import apply_rope, rope_tables, silu_mul
from training.packing import Packed


@dataclass
class TinyConfig:
    vocab_size: int = 151936  # of the exported model
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    router_aux_loss_coef: float = 0.001

    def hf_config(self) -> dict:
        """config.json of the exported checkpoint."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.moe_intermediate_size * self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "output_router_logits": False, "router_aux_loss_coef": self.router_aux_loss_coef,
            "rope_theta": self.rope_theta, "rope_scaling": None, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": True, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": self.num_hidden_layers,
            "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
        }


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch's fused RMSNorm: in float32 the same values as the engine's `layers.rms_norm`
    (tested), with fewer elementwise passes forward and backward (~4% of a training step)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _init(*shape: int, std: float = 0.02) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


def expert_rows(xs: torch.Tensor, counts: list[int], w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU over rows sorted by expert (counts[e] rows each), one matmul per expert joined by
    cat: unlike writing into slices of one output or indexing the weights per expert, its backward
    allocates no full-size zeros per expert (a training step 1.55 -> 1.15-1.3 s on 2 Intel cores;
    torch._grouped_mm has no CPU backward)."""
    w_gate_up = torch.cat((w_gate, w_up), dim=1).unbind(0)  # unbind: its backward is one stack
    downs = w_down.unbind(0)
    return torch.cat([
        silu_mul(p @ w_gate_up[e].T) @ downs[e].T for e, p in enumerate(xs.split(counts)) if counts[e]
    ])


class Block(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        h, d, e, i = c.hidden_size, c.head_dim, c.num_experts, c.moe_intermediate_size
        self.c = c
        self.input_norm = nn.Parameter(torch.ones(h))
        self.q = _init(c.num_attention_heads * d, h)
        self.k = _init(c.num_key_value_heads * d, h)
        self.v = _init(c.num_key_value_heads * d, h)
        self.o = _init(h, c.num_attention_heads * d, std=0.02 / math.sqrt(2 * c.num_hidden_layers))
        self.q_norm = nn.Parameter(torch.ones(d))
        self.k_norm = nn.Parameter(torch.ones(d))
        self.post_norm = nn.Parameter(torch.ones(h))
        self.gate = _init(e, h)
        self.w_gate = _init(e, i, h)
        self.w_up = _init(e, i, h)
        self.w_down = _init(e, h, i, std=0.02 / math.sqrt(2 * c.num_hidden_layers))

    def attention(self, x: torch.Tensor, p: Packed, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] packed; attention runs per group of similar lengths, padded (`Packed`)."""
        c, d = self.c, self.c.head_dim
        q = rms_norm((x @ self.q.T).view(len(x), -1, d), self.q_norm, c.rms_norm_eps)
        k = rms_norm((x @ self.k.T).view(len(x), -1, d), self.k_norm, c.rms_norm_eps)
        v = (x @ self.v.T).view(len(x), -1, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = [F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
               for qg, kg, vg in zip(p.padded(q), p.padded(k), p.padded(v))]
        return p.unpadded(out).reshape(len(x), -1) @ self.o.T

    def moe(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax top-k routing renormalised (norm_topk_prob), experts grouped as the engine groups
        them (cluster.model.qwen3_moe); returns the output and the Switch-style load-balancing loss."""
        c = self.c
        probs = torch.softmax((x @ self.gate.T).float(), dim=-1)
        top_w, top_i = probs.topk(c.num_experts_per_tok, dim=-1)
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        order, per_expert = sort_by_expert(top_i, c.num_experts)
        token = order // c.num_experts_per_tok
        y = expert_rows(x.index_select(0, token), per_expert, self.w_gate, self.w_up, self.w_down)
        out = torch.zeros_like(x).index_add(0, token, y * top_w.reshape(-1)[order, None])
        hits = torch.tensor(per_expert)
        counts += hits
        aux = c.num_experts * (hits.float() / order.numel() * probs.mean(0)).sum()
        return out, aux

    def forward(self, h: torch.Tensor, p: Packed, cos: torch.Tensor, sin: torch.Tensor, counts: torch.Tensor):  # noqa: ANN201
        h = h + self.attention(rms_norm(h, self.input_norm, self.c.rms_norm_eps), p, cos, sin)
        m, aux = self.moe(rms_norm(h, self.post_norm, self.c.rms_norm_eps), counts)
        return h + m, aux


class TinyQwen3Moe(nn.Module):
    def __init__(self, c: TinyConfig, used_ids: list[int]) -> None:
        super().__init__()
        self.c = c
        self.register_buffer("used_ids", torch.tensor(used_ids, dtype=torch.long), persistent=False)
        self.embed = _init(len(used_ids) + 1, c.hidden_size)  # last row: every unused token
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.unused_log_count = math.log(c.vocab_size - len(used_ids))
        cos, sin = rope_tables(ModelConfig.from_dict(c.hf_config()), c.max_position_embeddings)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.expert_counts = torch.zeros(c.num_hidden_layers, c.num_experts, dtype=torch.long)

    def forward(self, p: Packed, at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact-vocabulary logits at the packed positions `at` (default: p.learned, the only
        ones a training step needs: the output layer is the largest matmul per token), the shared
        row already raised by log(#unused); and the mean load-balancing loss."""
        cos, sin = self.cos[p.pos, None, :], self.sin[p.pos, None, :]
        h = F.embedding(p.ids, self.embed)
        aux = h.new_zeros(())
        for i, block in enumerate(self.blocks):
            h, a = block(h, p, cos, sin, self.expert_counts[i])
            aux = aux + a
        h = h.index_select(0, p.learned if at is None else at)
        logits = rms_norm(h, self.norm, self.c.rms_norm_eps) @ self.embed.T
        shift = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        shift[-1] = self.unused_log_count
        return logits + shift, aux / len(self.blocks)

    def _hub_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor but the embedding under its hub name (views of the parameters): what
        export() writes and load_export() reads back."""
        out = {"model.norm.weight": self.norm}
        for i, b in enumerate(self.blocks):
            p = f"model.layers.{i}."
            out.update({
                p + "input_layernorm.weight": b.input_norm, p + "post_attention_layernorm.weight": b.post_norm,
                p + "self_attn.q_proj.weight": b.q, p + "self_attn.k_proj.weight": b.k,
                p + "self_attn.v_proj.weight": b.v, p + "self_attn.o_proj.weight": b.o,
                p + "self_attn.q_norm.weight": b.q_norm, p + "self_attn.k_norm.weight": b.k_norm,
                p + "mlp.gate.weight": b.gate,
            })
            for e in range(self.c.num_experts):
                q = f"{p}mlp.experts.{e}."
                out[q + "gate_proj.weight"] = b.w_gate[e]
                out[q + "up_proj.weight"] = b.w_up[e]
                out[q + "down_proj.weight"] = b.w_down[e]
        return out

    @torch.no_grad()
    def load_export(self, tensors: dict[str, torch.Tensor]) -> None:
        """Starts from an exported checkpoint (to train on from it): the inverse of export().
        A token used now but not then starts from the checkpoint's shared unused row."""
        full = tensors["model.embed_tokens.weight"].float()
        unused = torch.ones(full.shape[0], dtype=torch.bool)
        unused[self.used_ids] = False
        self.embed[:-1] = full[self.used_ids]
        self.embed[-1] = full[unused.nonzero()[0, 0]]
        for name, param in self._hub_tensors().items():
            param.copy_(tensors[name])

    @torch.no_grad()
    def export(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """Hub-layout tensors at the full vocabulary."""
        c = self.c
        embed = self.embed[-1].expand(c.vocab_size, -1).clone()
        embed[self.used_ids] = self.embed[:-1]
        out = {"model.embed_tokens.weight": embed, **self._hub_tensors()}
        return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}
