"""The expert-parallel tests' shared workload: greedy sampling, prompts of several lengths, and
the bytes one expert takes."""

from __future__ import annotations

from cluster import SamplingParams
from cluster.config import ModelConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], list(range(20, 61)), [7] * 9, [300, 12], list(range(100, 118))]


def expert_bytes(cfg: ModelConfig) -> int:
    """float32 bytes of one expert across every MoE layer."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4 * len(cfg.moe_layers)
