"""Checkpoints side by side on one held-out set: each served in turn by `q3serve up --model DIR`
and asked the same `q3serve eval` items (greedy), so that a retrain is judged against the model it
would replace on more items than the shipped eval's 30 per task (at 30, one condition's 210 items
carry a standard error of ~3 points: two draws of one recipe differed by 0.03). Per condition:
each model's accuracy with its standard error, and against the first model the items one got right
and the other wrong (a paired count: the same items, so it separates a real change from the draw).
Not part of the test suite.

    python -m benchmarks.eval_compare --model before=DIR --model after=models/q3serve-tiny-thinker \\
        [--per-task 100] [--seed 7] [--budgets 32,128] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.servers import UpServer
from deployments.tools.evaluate import evaluate
from deployments.tools.machine import describe_machine

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("all", "multi_step")


def run_one(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    with UpServer(args=["--model", model_dir]) as server:
        return evaluate(server.url, per_task=args.per_task, budgets=[int(b) for b in args.budgets.split(",")],
                        seed=args.seed, concurrency=args.concurrency, progress=False, tool_items=args.tool_items,
                        json_items=args.tool_items, add_items=args.tool_items)


def paired(first: list[dict[str, Any]], other: list[dict[str, Any]], condition: str) -> dict[str, int]:
    """Items of `condition` (the original kinds) right in one run and wrong in the other."""
    def right(records: list[dict[str, Any]]) -> dict[str, bool]:
        return {r["key"]: r["correct"] for r in records if r["condition"] == condition}
    a, b = right(first), right(other)
    return {"gained": sum(b[k] and not a[k] for k in a if k in b), "lost": sum(a[k] and not b[k] for k in a if k in b)}


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = list(runs)
    base = runs[names[0]]
    table: dict[str, Any] = {}
    for cond in base["summary"]:
        row: dict[str, Any] = {}
        for name in names:
            s = runs[name]["summary"][cond]
            row[name] = {c: {"accuracy": s[c]["accuracy"], "n": s[c]["n"],
                             "stderr": round(math.sqrt(s[c]["accuracy"] * (1 - s[c]["accuracy"]) / s[c]["n"]), 4)}
                         for c in COLUMNS}
            row[name].update({k: s[k]["accuracy"] for k in s if k not in COLUMNS})
            if name != names[0]:
                row[name]["vs_" + names[0]] = paired(base["records"], runs[name]["records"], cond)
        table[cond] = row
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR, in order (the first is the base)")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7, help="of the held-out set (the shipped eval uses 1234)")
    ap.add_argument("--budgets", default="32,128")
    ap.add_argument("--tool-items", type=int, default=0, help="tool, JSON and add-tool items (0 skips them)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_compare.json")
    args = ap.parse_args()
    runs: dict[str, dict[str, Any]] = {}
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        runs[name] = run_one(model_dir, args)
        print(name, {c: runs[name]["summary"][c]["all"]["accuracy"] for c in runs[name]["summary"]}, flush=True)
    result = {"machine": describe_machine(), "models": dict(s.partition("=")[::2] for s in args.model),
              "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
              "conditions": compare(runs),
              "extras": {name: {k: r[k] for k in ("tool_use", "json", "add_tool")} for name, r in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["conditions"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
