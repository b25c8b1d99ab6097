"""benchmarks/eval_compare.py's table: accuracies with their standard errors, and the paired
counts of items one checkpoint got right and the other wrong (on the same items)."""

from __future__ import annotations

from benchmarks.eval_compare import compare, paired


def _run(right: dict[str, bool]) -> dict:
    records = [{"condition": "thinking", "key": k, "correct": v} for k, v in right.items()]
    acc = sum(right.values()) / len(right)
    cell = {"accuracy": acc, "n": len(right)}
    return {"summary": {"thinking": {"all": cell, "multi_step": cell, "add": {"accuracy": acc}}}, "records": records}


def test_paired_counts_and_stderr() -> None:
    before = _run({"a": True, "b": True, "c": False, "d": False})
    after = _run({"a": True, "b": False, "c": True, "d": True})
    assert paired(before["records"], after["records"], "thinking") == {"gained": 2, "lost": 1}
    assert paired(before["records"], after["records"], "non-thinking") == {"gained": 0, "lost": 0}
    table = compare({"before": before, "after": after})["thinking"]
    assert table["before"]["all"] == {"accuracy": 0.5, "n": 4, "stderr": 0.25}
    assert table["after"]["vs_before"] == {"gained": 2, "lost": 1} and "vs_before" not in table["before"]
    assert table["after"]["add"] == 0.75
