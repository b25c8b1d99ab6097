"""Expert placement maps: contiguous and EPLB-style load-balanced with redundant copies."""

from __future__ import annotations

import pytest
import torch

from cluster.parallel.placement import ExpertPlacement, contiguous, load_balanced


def test_contiguous_uneven_split() -> None:
    p = contiguous(8, 3, num_layers=2)
    assert p.slots[0] == ((0, 1, 2), (3, 4), (5, 6, 7))
    assert p.slots[1] == p.slots[0]
    assert p.replicas(0)[4] == [(1, 1)]


def test_contiguous_rejects_more_groups_than_experts() -> None:
    with pytest.raises(ValueError, match="expert_groups"):
        contiguous(4, 5, 1)


def test_load_balanced_replicates_hottest_and_balances() -> None:
    counts = torch.tensor([[1000, 10, 10, 10, 10, 10, 10, 10], [5, 5, 5, 5, 5, 5, 5, 400]])
    p = load_balanced(counts, num_groups=2, redundant=2)
    for layer, hot in ((0, 0), (1, 7)):
        groups = p.slots[layer]
        assert all(len(g) == 5 for g in groups)
        copies = [g for g in groups if hot in g]
        assert len(copies) == 2, "the hottest expert gets a copy on each group"
        # With the hot expert's load split over its copies, both groups carry similar load.
        reps = p.replicas(layer)
        load = [sum(counts[layer, e].item() / len(reps[e]) for e in g) for g in groups]
        assert max(load) / min(load) < 1.2
    num_copies, group, slot = p.routing_tables(0)
    assert num_copies[0] == 2 and {group[0, 0].item(), group[0, 1].item()} == {0, 1}


def test_load_balanced_needs_divisible_slots() -> None:
    with pytest.raises(ValueError, match="redundant"):
        load_balanced(torch.ones(1, 8), num_groups=3, redundant=0)


def test_placement_must_cover_every_expert() -> None:
    with pytest.raises(ValueError, match=r"no copy of experts \[3\]"):
        ExpertPlacement(4, 2, (((0, 1), (2, 2)),))
