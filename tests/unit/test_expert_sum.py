"""The GPU's way of summing each token's expert outputs (`unsort_weighted_sum`: back to (token,
slot) order, one batched matmul) gives the CPU's index_add_ sum, for every caller's row order."""

from __future__ import annotations

import torch

from cluster.model.experts import sort_by_expert, unsort_weighted_sum, weighted_sum_back


def _case(t: int = 9, k: int = 3, e: int = 5, h: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, h, generator=g, dtype=torch.float64)
    ids = torch.randint(0, e, (t, k), generator=g)
    weights = torch.rand(t, k, generator=g, dtype=torch.float64)
    return x, ids, weights


def test_unsorted_sum_equals_the_index_add_sum() -> None:
    x, ids, weights = _case()
    order, _ = sort_by_expert(ids, 5)
    rows = torch.randn(order.numel(), x.shape[1], dtype=torch.float64)  # an expert's output per sorted row
    got = unsort_weighted_sum(rows.clone(), order, weights)
    want = weighted_sum_back(x, rows.clone(), order, weights)  # x on the CPU: the index_add_ path
    k = ids.shape[1]
    by_hand = torch.zeros_like(x)
    for j, pair in enumerate(order.tolist()):
        by_hand[pair // k] += weights.reshape(-1)[pair] * rows[j]
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(want, by_hand)


def test_any_row_order_works() -> None:
    """The expert-parallel dispatch hands rows in destination-rank order, not expert order."""
    x, ids, weights = _case(t=6, k=2)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    rows = torch.randn(12, x.shape[1], dtype=torch.float64)
    flat_rows = torch.empty_like(rows)
    flat_rows[order] = rows
    want = (weights.unsqueeze(-1) * flat_rows.view(6, 2, -1)).sum(1)
    torch.testing.assert_close(unsort_weighted_sum(rows, order, weights), want)
