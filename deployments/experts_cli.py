"""`q3serve experts collect | prune | place`: expert usage measured through the engine, pruned
checkpoints (cluster/model/prune.py) and load-balanced placement maps (cluster/parallel/placement.py)
computed from it."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def calibration_conversations(prompts: str | None, tasks: int, seed: int) -> list[list[dict]]:
    """User turns from a prompt file (one prompt per line, or JSONL with `messages` or `prompt`),
    or `tasks` items of the eval's task generators drawn from the training side of the split,
    so the held-out set `q3serve eval` scores stays unseen by the calibration."""
    if prompts:
        out = []
        for i, line in enumerate(Path(prompts).read_text().splitlines()):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"prompts: line {i + 1} is not JSON: {exc}") from None
                if "messages" in raw:
                    out.append(raw["messages"])
                elif "prompt" in raw:
                    out.append([{"role": "user", "content": str(raw["prompt"])}])
                else:
                    raise ValueError(f"prompts: line {i + 1} has neither 'messages' nor 'prompt'")
            else:
                out.append([{"role": "user", "content": line}])
        if not out:
            raise ValueError(f"prompts: {prompts} holds no prompt")
        return out
    from deployments.tools.tasks import sample

    rng = random.Random(seed)
    return [[{"role": "user", "content": sample(rng, held_out=False).question}] for _ in range(tasks)]


def collect(args: argparse.Namespace) -> int:
    from cluster import LLM, SamplingParams
    from cluster.default_model import default_model_path
    from cluster import ExpertUsage, model_identity

    model = Path(args.model or default_model_path())
    conversations = calibration_conversations(args.prompts, args.tasks, args.seed)
    modes = {"thinking": [True], "no-think": [False], "both": [True, False]}[args.mode]
    llm = LLM(model, dtype=args.dtype)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for thinking in modes:
            llm.chat(conversations, params, enable_thinking=thinking, use_tqdm=True)
        usage = ExpertUsage.from_tensor(
            llm.expert_usage(), llm.model_config, model_identity(model),
            f"q3serve experts collect: {len(conversations)} conversations "
            f"({args.prompts or 'training-side tasks'}), mode {args.mode}, max_tokens {args.max_tokens}",
        )
    finally:
        llm.shutdown()
    usage.save(args.out)
    total = sum(usage.tokens[0]) / max(1, usage.top_k) if usage.tokens else 0
    print(f"{args.out}: {len(usage.moe_layers)} MoE layers x {usage.num_experts} experts, {total:.0f} tokens")
    return 0


def prune(args: argparse.Namespace) -> int:
    from cluster.config import ModelConfig
    from cluster import ExpertUsage, most_used
    from cluster import prune_checkpoint

    usage = ExpertUsage.load(args.usage)
    usage.check_model(args.model)
    cfg = ModelConfig.from_pretrained(args.model)
    if (args.keep is None) == (args.keep_fraction is None):
        raise ValueError("keep: give --keep N or --keep-fraction F")
    keep = args.keep if args.keep is not None else round(args.keep_fraction * cfg.num_experts)
    top_k = args.top_k if args.top_k is not None else cfg.num_experts_per_tok
    usage.top_k = top_k  # a smaller top-k may allow keeping fewer
    chosen = most_used(usage, keep, args.by)
    prune_checkpoint(args.model, args.out, chosen, top_k=args.top_k,
                     record={"by": args.by, "usage": str(Path(args.usage).resolve()), "usage_source": usage.source})
    print(f"{args.out}: {keep} of {cfg.num_experts} experts per layer kept (by {args.by}), top-k {top_k}")
    return 0


def place(args: argparse.Namespace) -> int:
    from cluster import ExpertUsage
    from cluster import contiguous, load_balanced, load_report

    usage = ExpertUsage.load(args.usage)
    if args.model:
        usage.check_model(args.model)
    counts = usage.scores("frequency")
    placement = load_balanced(counts, args.groups, args.redundant)
    report = {"balanced": load_report(placement, counts),
              "contiguous": load_report(contiguous(usage.num_experts, args.groups, len(usage.moe_layers)), counts),
              "usage": str(Path(args.usage).resolve()), "redundant": args.redundant}
    placement.save(args.out, model=usage.model, report=report)
    b, c = report["balanced"], report["contiguous"]
    print(f"{args.out}: {args.groups} groups, {args.redundant} redundant copies per layer")
    print(f"  largest group's tokens summed over layers: {b['max_group_tokens_sum']:.0f} "
          f"(contiguous: {c['max_group_tokens_sum']:.0f}); largest / mean group: {b['imbalance_mean']:.3f} "
          f"(contiguous: {c['imbalance_mean']:.3f})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    experts = sub.add_parser("experts", help="expert usage statistics, pruning and load-balanced placement")
    cmds = experts.add_subparsers(dest="experts_command", required=True)
    c = cmds.add_parser("collect", help="measure per-expert usage over calibration prompts through the engine")
    c.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    c.add_argument("--prompts", default=None, help="prompt file: one per line, or JSONL with messages / prompt")
    c.add_argument("--tasks", type=int, default=256, help="without --prompts: this many training-side eval tasks")
    c.add_argument("--mode", choices=("thinking", "no-think", "both"), default="both")
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="auto")
    c.add_argument("--out", default="expert_usage.json")
    c.set_defaults(func=collect)
    p = cmds.add_parser("prune", help="write a checkpoint without each layer's least-used experts")
    p.add_argument("--model", required=True, help="the checkpoint the usage was measured on")
    p.add_argument("--usage", required=True, help="a file from `q3serve experts collect` (or the admin endpoint)")
    p.add_argument("--keep", type=int, default=None, help="experts kept per layer")
    p.add_argument("--keep-fraction", type=float, default=None, help="share of experts kept per layer")
    p.add_argument("--by", choices=("frequency", "weight"), default="frequency",
                   help="rank experts by tokens routed or by summed routing weight")
    p.add_argument("--top-k", type=int, default=None, help="experts per token in the pruned model (default: unchanged)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=prune)
    pl = cmds.add_parser("place", help="a load-balanced expert placement map from usage (DeepSeek-EPLB style)")
    pl.add_argument("--usage", required=True)
    pl.add_argument("--model", default=None, help="check the usage was measured on this checkpoint")
    pl.add_argument("--groups", type=int, required=True, help="expert groups of the pool")
    pl.add_argument("--redundant", type=int, default=0, help="extra expert copies per layer (hottest experts)")
    pl.add_argument("--out", default="placement.json")
    pl.set_defaults(func=place)

