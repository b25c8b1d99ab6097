"""The sampler draws from exactly the distribution the parameters define: a chi-square test of
many draws against the filtered softmax computed directly (top-k, then top-p renormalised, then
min-p), on every path the sampler has (candidates, a nucleus wider than the candidates, the full
vocabulary), in mixed batches; filtered-out tokens are never drawn; a seeded row draws the same
whatever the rest of the batch is."""

from __future__ import annotations

import pytest
import torch
from cluster import SamplingParams
from cluster.model import sampler
from cluster.model.sampler import sample


def chi2_999(dof: int) -> float:
    """The chi-square distribution's 99.9th percentile (Wilson-Hilferty, within 1% for dof >= 2)."""
    z = 3.0902
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def exact(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The reference: float64, sorting the whole vocabulary."""
    x = logits.double() / p.temperature
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if p.top_p < 1:
        s, order = probs.sort(descending=True)
        drop = s.cumsum(0) - s > p.top_p
        probs = probs.masked_fill(drop.scatter(0, order, drop), 0.0)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < probs.max() * p.min_p, 0.0)
    return probs / probs.sum()


CASES = [
    SamplingParams(temperature=1.0),                           # full vocabulary
    SamplingParams(temperature=0.7, top_p=0.8, top_k=20),      # Qwen3 non-thinking
    SamplingParams(temperature=0.6, top_p=0.95, top_k=20),     # Qwen3 thinking
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.6),                # nucleus inside the candidates
    SamplingParams(temperature=1.0, top_p=0.999),              # nucleus wider than the candidates
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.8, top_k=30, min_p=0.05),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_draws_match_the_exact_distribution(params: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 32)  # so that a wide nucleus takes the full path here
    torch.manual_seed(0)
    vocab, n = 300, 30_000
    logits = torch.randn(vocab)
    # A mixed batch: greedy rows and another sampled configuration interleaved with the tested rows.
    other = SamplingParams(temperature=1.0, top_k=3)
    rows = [params if i % 3 else (SamplingParams(temperature=0.0) if i % 2 else other) for i in range(n)]
    toks, _, _ = sample(logits.expand(n, -1).contiguous(), rows, [None] * n)
    mine = torch.tensor([t for t, p in zip(toks, rows) if p is params])
    counts = torch.bincount(mine, minlength=vocab).double()
    expected = exact(logits, params) * len(mine)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    keep = expected > 5  # pool the rare tail into one cell, as a chi-square test needs
    obs = torch.cat([counts[keep], counts[~keep & (expected > 0)].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep & (expected > 0)].sum().view(1)])
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    stat = ((obs - exp) ** 2 / exp).sum().item()
    dof = len(exp) - 1
    assert dof >= 2, "the case leaves too few tokens to test"
    assert stat < chi2_999(dof), (stat, dof)
    greedy = [t for t, p in zip(toks, rows) if p.greedy]
    assert set(greedy) == {int(logits.argmax())}


def test_a_far_nucleus_is_not_cut_to_the_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat logits: top_p 0.9 needs 90% of the vocabulary, far more than the candidates."""
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 8)
    n, vocab = 4000, 100
    toks, _, _ = sample(torch.zeros(n, vocab), [SamplingParams(temperature=1.0, top_p=0.9)] * n, [None] * n)
    assert len(set(toks)) > 80


def test_seeded_rows_ignore_the_batch() -> None:
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=5)
    alone = [sample(logits[:1], [p], [torch.Generator().manual_seed(5)])[0][0] for _ in range(2)]
    mixed_params = [p, SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, top_p=0.5)]
    mixed = sample(logits[:4], mixed_params, [torch.Generator().manual_seed(5), None, None, None])[0][0]
    assert alone[0] == alone[1] == mixed


def test_uniform_at_the_top_edge_takes_the_last_token_with_mass() -> None:
    """u * total rounded up to the total must not pick a token past the last one allowed."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert sampler._inverse_cdf(probs.clone(), torch.tensor([1.0])).item() == 1
    assert sampler._inverse_cdf(probs.clone(), torch.tensor([0.0])).item() == 0
