"""The synthetic tasks: answers recomputed independently from each item's key, steps that end in
the answer, and a held-out split that training never draws from."""

from __future__ import annotations

import random

import pytest

from deployments.tools.tasks import KINDS, WORDS, check, eval_set, is_held_out, sample


def _recompute(key: str) -> str:
    kind, *args = key.split(":")
    if kind == "add":
        return str(int(args[0]) + int(args[1]))
    if kind == "sub":
        return str(int(args[0]) - int(args[1]))
    if kind == "mul":
        return str(int(args[0]) * int(args[1]))
    if kind == "sort":
        nums = [int(x) for x in args[1].split(", ")]
        return ", ".join(map(str, sorted(nums, reverse=args[0] == "1")))
    if kind == "compare":
        return args[2] if args[0] == "1" else args[1]
    if kind == "count":
        return str(args[0].count(args[1]))
    if kind == "word":
        total = int(args[0])
        for op in args[1:]:
            total = total + int(op[1:]) if op[0] == "+" else total - int(op[1:])
        return str(total)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_answers_and_steps(kind: str) -> None:
    rng = random.Random(7)
    for _ in range(300):
        t = sample(rng, held_out=False, kind=kind)
        assert t.kind == kind and t.answer == _recompute(t.key), t
        assert t.answer in t.steps.splitlines()[-1], t.steps  # the thinking ends at the answer
        assert len(t.steps.splitlines()) >= 2
        assert check(t, f" {t.answer}.") and not check(t, t.answer + "0")


def test_question_carries_the_operands() -> None:
    rng = random.Random(3)
    t = sample(rng, held_out=False, kind="add")
    a, b = t.key.split(":")[1:]
    assert a in t.question and b in t.question


def test_held_out_split_is_disjoint_and_fixed() -> None:
    held = eval_set(per_kind=15, seed=1234)
    assert len(held) == 15 * len(KINDS) and len({t.key for t in held}) == len(held)
    assert all(t.held_out for t in held)
    assert [t.question for t in held] == [t.question for t in eval_set(per_kind=15, seed=1234)]
    rng = random.Random(0)
    train_keys = {sample(rng, held_out=False).key for _ in range(5000)}
    assert not any(is_held_out(k) for k in train_keys)
    assert not train_keys & {t.key for t in held}
    share = sum(is_held_out(f"count:{w}:{c}") for w in WORDS for c in "abcdefghijklmnopqrstuvwxyz") / (26 * len(WORDS))
    assert 0.05 < share < 0.15  # about HELD_OUT_PERCENT of every space is kept back
