"""Trains the embedded default model: a small Qwen3-MoE that learned Qwen3's two modes on
checkable tasks, and to call a multiplication tool in Qwen3's format for products too large for
it. Plain PyTorch on CPU, seeded, from nothing in about an hour on 2 cores:

    python -m training.train --out models/q3serve-tiny-thinker

Writes a Hugging Face checkpoint (config.json, generation_config.json, model.safetensors in bf16)
plus training.json (settings, loss curve, time, per-expert routing counts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from deployments.tools.machine import describe_machine
from cluster.engine.tokenizer import ENDOFTEXT, IM_END, IM_START, THINK_END, THINK_START, load_tokenizer
from training.data import Example, random_example
from training.model import TinyConfig, TinyQwen3Moe
from training.packing import Packed, pack
from deployments.tools.tasks import count

# Qwen3's own sampling defaults (what a server applies when a request sets none); do_sample stays
# False so that transformers' generate() is greedy unless asked, as the tests compare against it.
GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                     "do_sample": False, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def used_token_ids(tokenizer, seed: int, n: int = 40000) -> list[int]:  # noqa: ANN001
    """Every token the task data can use, found by rendering many examples of both splits."""
    rng = random.Random(seed)
    ids = {IM_START, IM_END, ENDOFTEXT, THINK_START, THINK_END}
    for i in range(n):
        ids.update(random_example(rng, tokenizer, held_out=i % 5 == 0).ids)
    for _ in range(n // 2):  # (word, letter, phrasing) is the most varied text
        ids.update(tokenizer.encode(count(rng).question, add_special_tokens=False))
    return sorted(ids)


def packed(examples: list[Example], remap: dict[int, int], groups: int) -> Packed:
    """The examples as one packed batch over the compact vocabulary (an unused id: the shared row)."""
    return pack([[remap.get(t, len(remap)) for t in e.ids] for e in examples], [e.learn for e in examples], groups)


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to a tenth as `progress` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def progress_at(step: int, elapsed_s: float, args: argparse.Namespace) -> float:
    """How far through the run: by steps, or by wall-clock when --minutes caps it (whichever is
    further), so that a time-budgeted run still ends its schedule at the low learning rate."""
    by_steps = (step - args.warmup) / max(1, args.steps - args.warmup)
    return max(by_steps, elapsed_s / (60 * args.minutes)) if args.minutes else by_steps


@dataclass
class Trained:
    model: TinyQwen3Moe
    used: list[int]
    losses: list[float]
    seconds: float


def train(args: argparse.Namespace) -> Trained:
    start = time.monotonic()  # the budget counts the vocabulary scan and the setup too
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    used = used_token_ids(tokenizer, args.seed, args.vocab_samples)
    init = load_file(str(Path(args.init) / "model.safetensors")) if args.init else None
    if init is not None:  # keep every token the checkpoint learned (the last row is a never-used id's)
        embed = init["model.embed_tokens.weight"]
        used = sorted(set(used) | set((embed != embed[-1]).any(dim=1).nonzero()[:, 0].tolist()))
    remap = {t: i for i, t in enumerate(used)}
    cfg = TinyConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_experts=args.experts,
                     num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate)
    model = TinyQwen3Moe(cfg, used)
    if init is not None:
        model.load_export(init)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    # fused: one kernel per parameter group instead of a dozen elementwise passes per tensor
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)
    rng = random.Random(args.seed)
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        elapsed = time.monotonic() - start
        if args.minutes and elapsed >= 60 * args.minutes:
            break
        examples = [random_example(rng, tokenizer) for _ in range(args.batch)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress_at(step, elapsed, args), args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        p = packed(examples, remap, args.attention_groups)
        logits, aux = model(p)
        loss = F.cross_entropy(logits, p.targets)  # the mean over every learned token of the step
        (loss + cfg.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", aux=f"{aux.item():.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(args, Trained(model, used, losses, time.monotonic() - start))  # a look before the end
    return Trained(model, used, losses, time.monotonic() - start)


def save(args: argparse.Namespace, run: Trained, dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, losses = run.model, run.losses
    save_file(model.export(dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.c.hf_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    every = max(1, len(losses) // 100)
    (out / "training.json").write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": describe_machine(), "seconds": round(run.seconds, 1), "used_tokens": len(run.used),
        "steps_done": len(losses), "loss_every": every, "loss": [round(sum(losses[i:i + every]) / len(losses[i:i + every]), 4)
                                      for i in range(0, len(losses), every)],
        "expert_counts_train": model.expert_counts.tolist(),
    }, indent=1) + "\n")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/q3serve-tiny-thinker")
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--minutes", type=float, default=None,
                   help="stop after this much training time (the schedule follows the clock), or at --steps")
    p.add_argument("--init", default=None, help="train on from this exported checkpoint (same architecture)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--attention-groups", type=int, default=8,
                   help="attention runs padded per group of similar lengths (the rest of the model packed)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-intermediate", type=int, default=128)
    p.add_argument("--vocab-samples", type=int, default=40000, help="examples rendered to find the used tokens")
    p.add_argument("--save-every", type=int, default=500, help="also save every N steps (overwritten)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = save(args, train(args))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
