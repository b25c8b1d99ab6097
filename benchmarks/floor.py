"""The read floor of a decode step: the bytes it must read over the device's measured read
bandwidth. A decode step is memory-bound, so this is the time no implementation can beat.

What a step must read: every dense weight once (attention projections, norms, router gates,
the final norm and the lm_head), the routed experts its batch touches (expected distinct experts
per layer under uniform routing), the KV of every sequence, and one embedding row per token (not
the embedding table). The bandwidth is a read-only kernel's (a large `sum`); a copy's figure
counts each byte twice (read and written), so it is reported beside, not used."""

from __future__ import annotations

import time
from typing import Any

import torch

QWEN3_30B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False, rope_theta=1000000.0,
    rms_norm_eps=1e-6)
TINY: dict[str, Any] = dict(
    QWEN3_30B, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4, vocab_size=151936)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def read_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes read per second by a sum over `gib` GiB (best of 10 after a warm-up)."""
    x = torch.ones(int(gib * (1 << 28)), dtype=torch.float32, device=device)
    best = float("inf")
    for i in range(12):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes read + written per second by a device-to-device copy of `gib` GiB."""
    x = torch.empty(int(gib * (1 << 28)), dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(device)
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - start)


def touched_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts a layer's `tokens` pick under uniform routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def step_read_bytes(spec: dict[str, Any], layers: int, batch: int, context: int, weight_bytes: float = 2,
                    expert_bytes_per_param: float | None = None, kv_bytes: float = 2) -> float:
    """Bytes one decode step of `batch` sequences at `context` tokens must read (see the module
    docstring); `expert_bytes_per_param` 1 + scales for FP8 experts."""
    h, v = spec["hidden_size"], spec["vocab_size"]
    heads, kvh, d = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    e, k, i = spec["num_experts"], spec["num_experts_per_tok"], spec["moe_intermediate_size"]
    attention = h * (heads + 2 * kvh) * d + heads * d * h + (heads + kvh) * d + 2 * h
    dense = layers * (attention + h * e) + h + h * v  # + final norm and lm_head
    per_expert = 3 * h * i * (expert_bytes_per_param or weight_bytes)
    experts = layers * touched_experts(e, k, batch) * per_expert
    kv = batch * context * layers * 2 * kvh * d * kv_bytes
    return dense * weight_bytes + experts + kv + batch * h * weight_bytes
