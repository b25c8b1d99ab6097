"""Building blocks of the Qwen3 forward: RMSNorm, rotary embeddings (with YaRN), and linear
layers with input-major weights. On CPU, at inference, each runs its native kernel when built
(cluster/native) and its PyTorch form otherwise; the PyTorch form is the reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cluster import native
from cluster.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32, cast back, then scaled: the order transformers uses, so bf16 matches too.
    `weight` is [D] or [heads, D] for x [..., heads, D]. On CPU, inference, the native kernel."""
    if (kernels := native.for_tensor(x)) is not None:
        return kernels.rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's step: (RMSNorm of residual + x, residual + x). The PyTorch twin of
    the fused kernel (cluster/kernels/gpu/norm_rope.py), which does both in one read."""
    h = residual + x
    return rms_norm(h, weight, eps), h


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


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up over a fused last dim (gate then up); in place when no gradient
    is being recorded."""
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    return F.silu(gate) * up if torch.is_grad_enabled() else F.silu(gate).mul_(up)


# Whether this CPU has AVX-512 (and so, on the EPYCs measured, bf16 dot products for oneDNN).
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def linear(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w_t (+ bias) with input-major weights [in, out]. The native matmul takes float32 at
    every size and half types for decode-sized inputs; beyond ~16 rows oneDNN's bf16 matmul
    (hardware bf16 dot products) is faster on an AVX-512 EPYC (cluster/native/gemm.h). Without
    AVX-512 oneDNN has no such instructions, and the native matmul takes every size."""
    kernels = native.for_tensor(x)
    if kernels is not None and (x.dtype == torch.float32 or not _AVX512 or x.numel() < 16 * x.shape[-1]):
        return kernels.linear(x, w_t, bias)
    out = x @ w_t
    return out if bias is None else out + bias


class Linear(nn.Module):
    """y = x W^T + b with W held input-major (`weight_t` = W^T, [in, out]): the layout the native
    matmul streams, and one MKL and oneDNN run as fast (weights.py fills it from the hub's [out, in] W)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight_t, self.bias)
