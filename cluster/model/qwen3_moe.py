"""The Qwen3-MoE forward in plain PyTorch over a paged KV cache.

Tokens of all scheduled sequences are flattened into one [T, hidden] batch: every linear layer
and the MoE run over that flat batch; only attention looks at sequence boundaries (see
`attention.py`). The experts of a MoE layer sit behind `SparseMoe.experts`, a callable taking
(hidden, expert ids, weights): locally a `LocalExperts`, on an attention shard a dispatcher that
sends tokens to expert-group actors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cluster.kernels import gpu as triton_kernels
from cluster.model.attention import AttentionMetadata, decode_attention, norm_rope, paged_attention
from cluster.config import ModelConfig
from cluster.model.experts import LocalExperts
from cluster import native
from cluster.model.layers import Linear, RMSNorm, add_rms_norm, linear, silu_mul
from cluster.model.profiler import section

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """GQA attention with per-head QK RMSNorm. q/k/v come from one fused projection, and the
    q and k heads are normalised and rotated together, which halves the small ops per layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = Linear(q, cfg.hidden_size, bias=cfg.attention_bias)
        # q_norm's weight repeated for each q head, then k_norm's for each kv head (weights.py).
        self.qk_norm = nn.Parameter(torch.ones(self.num_heads + self.num_kv_heads, self.head_dim))
        self.kv_cache = torch.empty(0)  # [blocks, block_size, 2 * kv_heads, head_dim]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t, h, kvh = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, h + 2 * kvh, self.head_dim)
        if meta.pure_decode and (gpu := triton_kernels.for_tensor(qkv)) is not None:
            # Decode on the GPU: norms, rotation and the cache write in one kernel, then the
            # paged kernel reads the blocks in place.
            q = gpu.qk_norm_rope_cache(qkv, self.qk_norm, self.eps, meta.cos, meta.sin, meta.slot_mapping,
                                       self.kv_cache, h)
            out = decode_attention(q, self.kv_cache, meta)
        else:
            q, kv = norm_rope(qkv, self.qk_norm, self.eps, meta.cos, meta.sin, h)
            out = paged_attention(q, kv, self.kv_cache, meta)
        return self.o_proj(out.reshape(t, h * self.head_dim))


class DenseMlp(nn.Module):
    """SwiGLU MLP (dense layers of Qwen3 and Qwen3-MoE's mlp_only_layers); gate/up fused."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class SparseMoe(nn.Module):
    """Router gate (softmax, top-k, optional renormalisation) in front of the experts. Keeps
    per-expert usage (tokens routed, and the summed routing weight they were given), which the
    load-balanced placement and expert pruning are computed from."""

    def __init__(self, cfg: ModelConfig, experts: ExpertsFn | None) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = experts if experts is not None else LocalExperts(cfg)
        # [0]: tokens routed to each expert, [1]: their summed routing weight (as applied)
        self.register_buffer("usage", torch.zeros(2, cfg.num_experts, dtype=torch.float64), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def count(self, ids: torch.Tensor, weights: torch.Tensor, row_mask: torch.Tensor | None) -> None:
        """Adds this batch's routing to `usage`; rows whose mask is 0 (a static step's padding)
        add nothing. index_add_, not bincount: no host sync on CUDA."""
        flat = ids.flatten()
        w = weights.flatten().to(self.usage.dtype)
        if row_mask is None:
            ones = torch.ones(flat.shape, dtype=self.usage.dtype, device=flat.device)
        else:
            ones = row_mask.to(self.usage.dtype)[:, None].expand(ids.shape).reshape(-1)
            w = w * ones
        self.usage[0].index_add_(0, flat, ones)
        self.usage[1].index_add_(0, flat, w)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """Moves with the module but stays float64: cast to bf16 with the weights, a counter
        stops at 256 (256 + 1 rounds back to 256)."""
        super()._apply(fn, recurse)
        if self.usage.dtype != torch.float64:
            self.usage = torch.zeros(self.usage.shape, dtype=torch.float64, device=self.usage.device)
        return self

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids, weights = self.route(x)
        gpu = triton_kernels.for_tensor(x)
        fused = getattr(self.experts, "fused", None) if gpu is not None else None
        if fused is not None and fused_moe_fits(x, self.experts):
            # The grouped kernel counts the usage in its own alignment pass.
            valid = None if row_mask is None else row_mask > 0
            return fused(gpu, x, ids, weights, valid, self.usage)
        self.count(ids, weights, row_mask)
        return self.experts(x, ids, weights.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertsFn | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            SparseMoe(cfg, experts) if cfg.is_moe_layer(layer) else DenseMlp(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next layer adds the two
        in the same pass as its norm (one fused kernel on the GPU)."""
        with section("attention"):
            if residual is None:
                h, residual = self.input_layernorm(x), x
            else:
                h, residual = _add_norm(x, residual, self.input_layernorm)
            h, residual = _add_norm(self.self_attn(h, meta), residual, self.post_attention_layernorm)
        with section("experts"):
            if isinstance(self.mlp, SparseMoe):
                return self.mlp(h, meta.row_mask), residual
            return self.mlp(h), residual


def _add_norm(x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x): the fused kernel on the GPU, its twin elsewhere."""
    if (gpu := triton_kernels.for_tensor(x)) is not None:
        return gpu.add_rms_norm(x, residual, norm.weight, norm.eps)
    return add_rms_norm(x, residual, norm.weight, norm.eps)


# Tokens up to which the grouped Triton MoE runs bf16 experts; past it (prefill) the grouped
# matmul, whose tiles suit large batches. FP8 experts take the kernel at every size.
FUSED_MOE_MAX_TOKENS = 256


def fused_moe_fits(x: torch.Tensor, experts: object) -> bool:
    return x.shape[0] <= FUSED_MOE_MAX_TOKENS or not isinstance(experts, LocalExperts)


class Qwen3MoeModel(nn.Module):
    """Embeddings, decoder layers, final norm and lm_head of Qwen3(-MoE).

    `experts(layer)` supplies each MoE layer's experts; None builds them locally.
    """

    def __init__(self, cfg: ModelConfig, experts: Callable[[int], ExpertsFn] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, experts(i) if experts and cfg.is_moe_layer(i) else None)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models share the embedding table (hub layout, [vocab, hidden]) as their head, so
        # that it is held once; untied heads are input-major like every other linear layer.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._tied_head_t: torch.Tensor | None = None  # a tied head's input-major copy, for the native matmul

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, meta)
        return residual + h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        with section("lm_head"):
            h = self.norm(h)
            if self.lm_head is not None:
                return self.lm_head(h)
            if native.for_tensor(h) is None:
                return F.linear(h, self.embed_tokens.weight)
            # On the CPU the tied head was PyTorch's matmul over the [vocab, hidden] table, most of
            # a served step for a small model; the native matmul needs it input-major: one copy.
            if self._tied_head_t is None:
                self._tied_head_t = self.embed_tokens.weight.detach().t().contiguous()
            return linear(h, self._tied_head_t)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: str) -> None:
        """Zero-filled so that masked-out padding slots never carry NaN into attention."""
        shape = (num_blocks, block_size, 2 * self.cfg.num_key_value_heads, self.cfg.head_dim)
        for layer in self.layers:
            layer.self_attn.kv_cache = torch.zeros(shape, dtype=dtype, device=device)

    def expert_usage(self) -> torch.Tensor:
        """[2, num_layers, num_experts] since start: tokens routed to each expert ([0]) and their
        summed routing weight ([1]); dense layers are 0."""
        out = torch.zeros(2, self.cfg.num_hidden_layers, max(self.cfg.num_experts, 1), dtype=torch.float64)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoe):
                out[:, i] = layer.mlp.usage.cpu()
        return out
