"""The Qwen3-MoE forward in plain PyTorch over a paged KV cache.

Tokens of all scheduled sequences are flattened into one [T, hidden] batch: every linear layer
and the MoE run over that flat batch; only attention looks at sequence boundaries (see
`attention.py`). The experts of a MoE layer sit behind `SparseMoe.experts`, a callable taking
(hidden, expert ids, weights): locally a `LocalExperts`, on an attention shard a dispatcher that
sends tokens to expert-group actors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cluster import native
from cluster.attention import AttentionMetadata, paged_attention
from cluster.config import ModelConfig
from cluster.profiler import section

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32, cast back, then scaled: the order transformers uses, so bf16 matches too.
    `weight` is [D] or [heads, D] for x [..., heads, D]. On CPU, inference, the native kernel."""
    if x.is_cpu and not torch.is_grad_enabled() and (kernels := native.kernels()) is not None:
        return kernels.rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] (float32), YaRN-scaled when the config asks for it.
    The sin table's first half is negated, the form `apply_rope` takes."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    inv_freq = 1.0 / pos_freqs
    scale = 1.0
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif rs.get("rope_type") == "yarn":
        inv_freq, scale = _yarn(rs, dim, base, pos_freqs)
    freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin() * scale
    sin[:, : dim // 2] *= -1  # rotate_half's negation, folded in once (see apply_rope)
    return emb.cos() * scale, sin


def _yarn(rs: dict, dim: int, base: float, pos_freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, ramp between."""
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos/sin [T, 1, d] from `rope_tables`, already in x's dtype.

    x * cos + rotate_half(x) * sin, with rotate_half's sign already in the sin table, so the
    rotation is one roll: the same products and sums as transformers, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def linear(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w_t (+ bias) with input-major weights [in, out]. The native matmul takes float32 at
    every size and half types for decode-sized inputs; beyond ~16 rows oneDNN's bf16 matmul
    (hardware bf16 dot products) is faster (measured on an AVX-512 EPYC, cluster/native/gemm.h)."""
    if (
        x.is_cpu and not torch.is_grad_enabled() and (x.dtype == torch.float32 or x.numel() < 16 * x.shape[-1])
        and (kernels := native.kernels()) is not None
    ):
        return kernels.linear(x, w_t, bias)
    out = x @ w_t
    return out if bias is None else out + bias


class Linear(nn.Module):
    """y = x W^T + b with W held input-major (`weight_t` = W^T, [in, out]): the layout the native
    matmul streams, and one MKL and oneDNN run as fast. `load` takes the hub's [out, in] W."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight_t.copy_(weight.t())
        if self.bias is not None:
            assert bias is not None
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight_t, self.bias)


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
        qk = apply_rope(rms_norm(qkv[:, : h + kvh], self.qk_norm, self.eps), meta.cos, meta.sin)
        kv = torch.cat([qk[:, h:], qkv[:, h + kvh:]], dim=1)
        out = paged_attention(qk[:, :h], kv, self.kv_cache, meta)
        return self.o_proj(out.view(t, h * self.head_dim))


class DenseMlp(nn.Module):
    """SwiGLU MLP (dense layers of Qwen3 and Qwen3-MoE's mlp_only_layers); gate/up fused."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over the fused last dim; in place when no gradient is being recorded."""
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    return F.silu(gate) * up if torch.is_grad_enabled() else F.silu(gate).mul_(up)


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: x [N, H], w_gate_up [H, 2I], w_down [I, H] (input-major, see LocalExperts)."""
    return _silu_mul(x @ w_gate_up) @ w_down


def use_padded(counts: list[int], n: int) -> bool:
    """Whether one padded batched matmul over all experts beats one matmul per expert.

    With few rows per expert (decode) per-expert calls cost more than their arithmetic, so
    padding every expert to the fullest one pays off while most experts are hit and the padding
    wastes little. From about 64 rows per expert on (prefill), per-expert matmuls are as fast
    and padding is pure waste (measured crossover on model (a)'s shapes, 2 cores)."""
    e = len(counts)
    cap = max(counts, default=0)
    hit = sum(1 for c in counts if c)
    return 0 < n < 64 * e and 2 * hit >= e and e * cap <= 3 * n


def padded_swiglu(
    rows: torch.Tensor, expert: torch.Tensor, slot: torch.Tensor, cap: int,
    w_gate_up: torch.Tensor, w_down: torch.Tensor,
) -> torch.Tensor:
    """All experts as one batched matmul: row r goes to padded slot `slot[r]` of expert
    `expert[r]` (each expert has `cap` slots); returns each row's expert output, in row order."""
    buf = rows.new_zeros(w_gate_up.shape[0], cap, rows.shape[1])
    buf[expert, slot] = rows
    act = _silu_mul(torch.bmm(buf, w_gate_up))
    return torch.bmm(act, w_down)[expert, slot]


def grouped_swiglu(
    xs: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over rows already sorted by expert: `counts[e]` consecutive rows go to local
    expert e (weights w_gate_up [E, H, 2I], w_down [E, I, H]). Never a loop over tokens: either
    one matmul per expert over its rows, or one padded batched matmul (see `use_padded`)."""
    n = xs.shape[0]
    if use_padded(counts, n):
        counts_t = torch.tensor(counts, device=xs.device)
        expert = torch.repeat_interleave(torch.arange(len(counts), device=xs.device), counts_t)
        slot = torch.arange(n, device=xs.device) - (counts_t.cumsum(0) - counts_t)[expert]
        return padded_swiglu(xs, expert, slot, max(counts), w_gate_up, w_down)
    out = torch.empty_like(xs)
    start = 0
    for i, rows in enumerate(counts):
        if rows:
            out[start : start + rows] = swiglu(xs[start : start + rows], w_gate_up[i], w_down[i])
            start += rows
    return out


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Stable order of flattened (token, slot) pairs by expert id, and the count per expert."""
    flat = ids.reshape(-1)
    return flat.argsort(stable=True), torch.bincount(flat, minlength=num_experts).tolist()


class LocalExperts(nn.Module):
    """All experts of one layer held in this process (single-process engine). Weights are
    input-major: w_gate_up [E, H, 2I] (gate then up), w_down [E, I, H].

    On CPU the native fused kernel runs them when it is built (cluster/native; measured 2-3x
    faster than the PyTorch path at every batch size in float32). The PyTorch path picks, by
    batch size, the way with the fewest kernel launches: one token runs its k experts directly; a decode batch goes into the padded batched
    matmul without sorting (each pair's slot is its rank among the pairs of its expert); large
    batches are sorted by expert and run one matmul per expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w_gate_up = nn.Parameter(torch.empty(e, h, 2 * i))
        self.w_down = nn.Parameter(torch.empty(e, i, h))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t, k = ids.shape
        e = self.w_gate_up.shape[0]
        if x.is_cpu and not torch.is_grad_enabled() and (kernels := native.kernels()) is not None:
            return kernels.moe_experts(x, ids, weights, self.w_gate_up, self.w_down)
        return self.forward_torch(x, ids, weights)

    def forward_torch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The PyTorch path (and the native kernel's reference)."""
        t, k = ids.shape
        if t == 1:
            ys = torch.cat([swiglu(x, self.w_gate_up[e], self.w_down[e]) for e in ids[0].tolist()])
            return weights @ ys
        e, n = self.w_gate_up.shape[0], t * k
        flat = ids.reshape(-1)
        if n < 64 * e:
            rank = torch.zeros(n, e, dtype=torch.int32, device=x.device).scatter_(1, flat[:, None], 1).cumsum_(0)
            counts = rank[-1].tolist()
            if use_padded(counts, n):
                slot = rank.gather(1, flat[:, None]).squeeze(1).sub_(1)
                y = padded_swiglu(x.repeat_interleave(k, 0), flat, slot, max(counts), self.w_gate_up, self.w_down)
                return torch.bmm(weights[:, None], y.view(t, k, -1)).squeeze(1)
        order, counts = sort_by_expert(ids, e)
        token = order // k
        out = grouped_swiglu(x[token], counts, self.w_gate_up, self.w_down)
        out.mul_(weights.reshape(-1)[order, None])
        return torch.zeros_like(x).index_add_(0, token, out)


class SparseMoe(nn.Module):
    """Router gate (softmax, top-k, optional renormalisation) in front of the experts. Keeps
    per-expert token counts, which the load-balanced placement is computed from."""

    def __init__(self, cfg: ModelConfig, experts: ExpertsFn | None) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = experts if experts is not None else LocalExperts(cfg)
        self.register_buffer("expert_counts", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.expert_counts += torch.bincount(ids.flatten(), minlength=self.expert_counts.numel())
        return ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        return self.experts(x, ids, weights)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertsFn | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            SparseMoe(cfg, experts) if cfg.is_moe_layer(layer) else DenseMlp(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        with section("attention"):
            h = h + self.self_attn(self.input_layernorm(h), meta)
        with section("experts"):
            return h + self.mlp(self.post_attention_layernorm(h))


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

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, meta)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        with section("lm_head"):
            h = self.norm(h)
            return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: str) -> None:
        """Zero-filled so that masked-out padding slots never carry NaN into attention."""
        shape = (num_blocks, block_size, 2 * self.cfg.num_key_value_heads, self.cfg.head_dim)
        for layer in self.layers:
            layer.self_attn.kv_cache = torch.zeros(shape, dtype=dtype, device=device)

    def expert_counts(self) -> torch.Tensor:
        """[num_layers, num_experts] tokens routed to each expert since start (dense layers: 0)."""
        out = torch.zeros(self.cfg.num_hidden_layers, max(self.cfg.num_experts, 1), dtype=torch.long)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoe):
                out[i] = layer.mlp.expert_counts
        return out
