"""A packed training batch (training/packing.py) is the padded batch without its padding: attention
groups cut where padded work is least, the layout round-trips, and a step's gradient is that of
each example trained alone."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from cluster.engine.tokenizer import IM_END, THINK_END, THINK_START, load_tokenizer
from training.data import random_example
from training.model import TinyConfig, TinyQwen3Moe
from training.packing import group_bounds, pack
from training.train import packed


def test_group_bounds_are_the_cheapest_cut() -> None:
    rng = random.Random(3)
    for _ in range(30):
        lengths = sorted(rng.randrange(1, 60) for _ in range(rng.randrange(1, 9)))
        n = rng.randrange(1, 5)
        cost = lambda b: sum((hi - lo) * lengths[hi - 1] ** 2 for lo, hi in zip(b, b[1:]))  # noqa: E731
        every = [[0, *cuts, len(lengths)] for k in range(min(n, len(lengths)))
                 for cuts in itertools.combinations(range(1, len(lengths)), k)]
        bounds = group_bounds(lengths, n)
        assert bounds[0] == 0 and bounds[-1] == len(lengths) and len(bounds) - 1 <= n
        assert cost(bounds) == min(cost(b) for b in every)


def test_padded_layout_round_trips() -> None:
    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14]]
    p = pack(rows, [[False, True, True], [True, True], [True] * 5, [False] * 4], groups=2)
    assert p.ids.tolist() == [4, 1, 2, 11, 12, 13, 6, 7, 8, 9]  # shortest first, each without its last id
    assert p.pos.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert p.learned.tolist() == [0, 1, 2, 6, 7, 8, 9] and p.targets.tolist() == [5, 2, 3, 7, 8, 9, 10]
    x = torch.arange(len(p.ids) * 2, dtype=torch.float).view(-1, 2) + 1
    parts = p.padded(x)
    assert [tuple(g.shape) for g in parts] == [(b, t, 2) for b, t in p.groups]
    assert sum(int((g == 0).all(-1).sum()) for g in parts) == sum(b * t for b, t in p.groups) - len(p.ids)
    assert torch.equal(p.unpadded(parts), x)


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return load_tokenizer()


def test_a_packed_step_has_the_gradient_of_each_example_alone(tok) -> None:  # noqa: ANN001
    rng = random.Random(8)
    examples = [random_example(rng, tok) for _ in range(12)]
    used = sorted({t for e in examples for t in e.ids} | {IM_END, THINK_START, THINK_END})
    remap = {t: i for i, t in enumerate(used)}
    torch.manual_seed(0)
    model = TinyQwen3Moe(TinyConfig(hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=4,
                                    moe_intermediate_size=16), used)
    learned = sum(sum(e.learn[1:]) for e in examples)

    def grads(batches: list[list]) -> list[torch.Tensor]:  # noqa: ANN001
        model.zero_grad()
        for b in batches:
            p = packed(b, remap, groups=3)
            logits, _ = model(p)
            (F.cross_entropy(logits, p.targets, reduction="sum") / learned).backward()
        return [p.grad.clone() for p in model.parameters()]

    together, alone = grads([examples]), grads([[e] for e in examples])
    assert len(packed(examples, remap, groups=3).groups) == 3
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
