"""Batched sampling with per-request parameters.

Greedy rows take the argmax. Other rows are scaled by temperature, filtered by top-k, top-p and
min-p, and sampled by the exponential race (argmax of p / E with E ~ Exp(1)), which needs one
noise vector per row: a request with a seed draws it from its own generator, so its output does
not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from cluster.config import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[float | None]]:
    """logits [B, V] -> (token ids, logprob of each chosen token under the model, or None)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows], [generators[i] for i in rows])
    want = [i for i, p in enumerate(params) if p.logprobs]
    lps: list[float | None] = [None] * len(params)
    if want:
        chosen = torch.log_softmax(logits[want], dim=-1).gather(1, tokens[want].unsqueeze(1)).squeeze(1)
        for i, v in zip(want, chosen.tolist()):
            lps[i] = v
    return tokens.tolist(), lps


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    logits = logits / temps.unsqueeze(1)
    top_k = [p.top_k for p in params]
    if any(top_k):
        k = torch.tensor([t if t > 0 else logits.shape[1] for t in top_k])
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
    if (top_p < 1).any():
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p.unsqueeze(1)  # never drops the top token
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype)
    if (min_p > 0).any():
        floor = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < floor, 0.0)
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)
