"""Expert pruning of the default model, scored through the serving API.

Usage is collected through the engine on training-side task prompts (both modes), checkpoints
are pruned to 75% and 50% of each layer's experts by routed-token frequency and by summed routing
weight, and each one (and the unpruned model) is served by `q3serve up --model` and scored by
`q3serve eval` on the held-out set, in both modes and with a thinking budget, plus the tool task.
Writes benchmarks/results/pruning.json and pruning.png.

    python -m benchmarks.pruning [--per-task 20] [--calibration 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from deployments.tools.machine import describe_machine
from benchmarks.servers import UpServer
from cluster.config import ModelConfig
from cluster.default_model import default_model_path
from cluster.model.expert_usage import ExpertUsage, most_used
from cluster.model.prune import prune_checkpoint
from deployments.tools.evaluate import evaluate

FRACTIONS = (0.75, 0.5)
METHODS = ("frequency", "weight")


def collect_usage(model: Path, n: int, max_tokens: int, out: Path) -> ExpertUsage:
    from deployments.cli import main as cli

    if cli(["experts", "collect", "--model", str(model), "--tasks", str(n), "--max-tokens", str(max_tokens),
            "--out", str(out)]) != 0:
        raise RuntimeError("q3serve experts collect failed")
    return ExpertUsage.load(out)


def score(model: Path, per_task: int, budget: int) -> dict:
    with UpServer(None, timeout_s=900, args=["--model", str(model)]) as server:
        result = evaluate(server.url, per_task=per_task, budgets=[budget], tool_items=per_task, progress=False)
    summary, tools = result["summary"], result["tool_use"]
    return {
        "non-thinking": summary["non-thinking"]["all"]["accuracy"],
        "thinking": summary["thinking"]["all"]["accuracy"],
        "thinking multi-step": summary["thinking"]["multi_step"]["accuracy"],
        f"budget {budget}": summary[f"budget-{budget}"]["all"]["accuracy"],
        "tool (thinking)": tools.get("thinking", {}).get("with_tool", {}).get("accuracy"),
        "tool (non-thinking)": tools.get("non-thinking", {}).get("with_tool", {}).get("accuracy"),
        "wall_s": result["wall_s"],
    }


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in next(iter(rows.values())) if m != "wall_s"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(metrics))], [row[m] or 0 for m in metrics], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics, fontsize=8)
    ax.set_ylabel("accuracy on held-out tasks")
    ax.set_ylim(0, 1.02)
    ax.set_title("Expert pruning of the default model, served (q3serve eval)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--per-task", type=int, default=20)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--calibration", type=int, default=256, help="training-side task prompts for the usage")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/pruning.json")
    args = ap.parse_args()
    model = Path(args.model or default_model_path())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    usage = collect_usage(model, args.calibration, args.max_tokens, out.with_name("expert_usage.json"))
    experts = ModelConfig.from_pretrained(model).num_experts
    rows = {"unpruned": score(model, args.per_task, args.budget)}
    print("unpruned", rows["unpruned"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in FRACTIONS:
            keep = round(fraction * experts)
            for by in METHODS:
                name = f"{keep}/{experts} by {by}"
                path = prune_checkpoint(model, Path(tmp) / name.replace("/", "of").replace(" ", "-"),
                                        most_used(usage, keep, by), record={"by": by})
                rows[name] = score(path, args.per_task, args.budget)
                print(name, rows[name], flush=True)
    result = {"machine": describe_machine(), "model": str(model), "usage": usage.source,
              "settings": {"per_task": args.per_task, "budget": args.budget, "temperature": 0.0}, "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
