"""Contiguous against load-balanced expert placement on the same model and traffic, measured.

The traffic (chat prompts of the default model's task kinds, greedy, both modes) runs through an
expert-parallel instance with the contiguous map; its per-expert counters give a load-balanced
map (with and without redundant copies); the same traffic runs again under each map. Per step
and MoE layer every expert group reports the rows its experts computed, and the layer's exchange
waits for the largest: the figure is that maximum, summed over layers, averaged over steps,
against the even share (all rows / groups). Greedy outputs must be equal under every map.

    python -m benchmarks.expert_placement [--model DIR] [--groups 4] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from deployments.tools.machine import describe_machine
from cluster import LLM, SamplingParams
from cluster.default_model import default_model_path
from cluster.parallel.placement import ExpertPlacement, contiguous, load_balanced, load_report


def traffic(n: int, seed: int) -> list[tuple[list[dict], bool]]:
    from deployments.tools.tasks import sample

    rng = random.Random(seed)
    return [([{"role": "user", "content": sample(rng, held_out=True).question}], i % 2 == 0) for i in range(n)]


def run(model: Path, placement: ExpertPlacement | str, groups: int, shards: int,
        convs: list[tuple[list[dict], bool]], max_tokens: int) -> dict:
    llm = LLM(model, attention_shards=shards, expert_groups=groups, placement=placement, dtype="float32")
    try:
        ex = llm.core.executor
        ex.expert_group_rows(reset=True)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        outs = []
        for thinking in (True, False):
            batch = [c for c, t in convs if t == thinking]
            outs += [o.token_ids for o in llm.chat(batch, params, enable_thinking=thinking)]
        rows = torch.tensor(ex.expert_group_rows(), dtype=torch.float64)  # [group, layer, step]
        usage = llm.expert_usage()[0][llm.core.model_config.moe_layers]
    finally:
        llm.shutdown()
    per_step_max = rows.max(dim=0).values.sum(dim=0)           # [step]: summed over layers
    per_step_even = rows.sum(dim=0).sum(dim=0) / rows.shape[0]
    busy = per_step_even > 0
    ratio = (per_step_max[busy] / per_step_even[busy]).tolist()
    return {"outputs": outs, "usage": usage, "steps": int(rows.shape[2]),
            "mean_max_group_rows_per_step": float(per_step_max[busy].mean()),
            "mean_even_share_per_step": float(per_step_even[busy].mean()),
            "mean_max_over_even": statistics.fmean(ratio), "p90_max_over_even": sorted(ratio)[int(0.9 * (len(ratio) - 1))],
            "total_rows": float(rows.sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/expert_placement.json")
    args = ap.parse_args()
    model = Path(args.model or default_model_path())
    convs = traffic(args.prompts, args.seed)
    base = run(model, "contiguous", args.groups, args.shards, convs, args.max_tokens)
    counts = base["usage"]
    maps = {"contiguous": contiguous(counts.shape[1], args.groups, counts.shape[0]),
            "balanced": load_balanced(counts, args.groups),
            f"balanced+{args.groups} redundant": load_balanced(counts, args.groups, redundant=args.groups)}
    results = {"contiguous": base}
    for name, placement in list(maps.items())[1:]:
        results[name] = run(model, placement, args.groups, args.shards, convs, args.max_tokens)
    equal = all(r["outputs"] == base["outputs"] for r in results.values())
    table = {}
    for name, r in results.items():
        table[name] = {k: v for k, v in r.items() if k not in ("outputs", "usage")}
        table[name]["expected"] = load_report(maps[name], counts)
    out = {"machine": describe_machine(), "model": str(model), "groups": args.groups, "shards": args.shards,
           "prompts": args.prompts, "max_tokens": args.max_tokens, "greedy_outputs_equal": equal, "maps": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, r in table.items():
        print(f"{name:>24}: largest group {r['mean_max_group_rows_per_step']:.1f} rows/step (summed over layers) against "
              f"an even {r['mean_even_share_per_step']:.1f}: x{r['mean_max_over_even']:.3f} (p90 x{r['p90_max_over_even']:.3f})")
    print(f"greedy outputs equal under every map: {equal}; wrote {args.out}")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
