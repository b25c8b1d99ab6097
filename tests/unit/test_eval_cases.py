"""`q3serve eval`'s new cases leave its original figures as they were: the new kinds get their
own columns (all and multi_step pool the original kinds alone, `records` holds only theirs), and
the JSON case asks what the issue's newcomer asks (the question alone under json_object /
json_schema without bounds, and instructor's JSON mode)."""

from __future__ import annotations

import json
import random

from cluster.engine.tokenizer import load_tokenizer, render_chat
from deployments.tools.tasks import KINDS, NEW_KINDS, sample


def test_eval_keeps_the_original_figures() -> None:
    """The new kinds get their own columns; all, multi_step and the original columns are computed
    from the original kinds' records alone, as before."""
    from deployments.tools.evaluate import Condition, summarize, table

    conds = [Condition("non-thinking", False), Condition("thinking", True)]
    rng = random.Random(5)

    def rec(cond: str, kind: str) -> dict:
        return {"condition": cond, "kind": kind, "correct": rng.random() < 0.5, "reasoning_tokens": rng.randint(0, 90),
                "completion_tokens": rng.randint(1, 120), "has_reasoning": cond == "thinking",
                "latency_s": rng.random()}

    old = [rec(c.name, k) for c in conds for k in KINDS for _ in range(4)]
    new = [rec(c.name, k) for c in conds for k in NEW_KINDS for _ in range(4)]
    before, after = summarize(old, conds), summarize(old, conds, new)
    for c in conds:
        assert list(after[c.name]) == [*KINDS, "multi_step", "all", *NEW_KINDS]
        assert {k: after[c.name][k] for k in before[c.name]} == before[c.name]
        assert after[c.name]["small"]["n"] == 4
    assert "small" in table(after).splitlines()[0] and "small" not in table(before).splitlines()[0]


def test_json_eval_requests() -> None:
    from deployments.tools.evaluate_tools import ANSWER_SCHEMA, JSON_FORMATS, json_request

    task = sample(random.Random(2), held_out=True, kind="small")
    for fmt in JSON_FORMATS:
        messages, rf, key = json_request(task, fmt)
        assert messages[-1] == {"role": "user", "content": task.question}
        assert rf["type"] in ("json_object", "json_schema")
    assert json_request(task, "json_schema")[1]["json_schema"]["schema"] == ANSWER_SCHEMA
    assert "maximum" not in json.dumps(ANSWER_SCHEMA)  # no bounds: the model must close the number itself
    assert json_request(task, "json_object")[0] == [{"role": "user", "content": task.question}]
    # a rendering check: what the server renders for the instructor request holds the schema
    tok_ = load_tokenizer()
    assert '"type": "integer"' in render_chat(tok_, json_request(task, "instructor_json")[0])
