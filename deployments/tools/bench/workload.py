"""The requests of one benchmark run, fixed by a seed before any is sent: prompts (random token
ids, as `vllm bench serve --dataset-name random` makes them, or the default model's held-out task
questions), output lengths, and each request's mode (thinking with a budget, or no-think)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestSpec:
    index: int
    mode: str                    # "thinking" | "no-think"
    prompt_ids: list[int] | None  # random dataset: the prompt as token ids
    prompt_text: str             # the same prompt as text (chat APIs), or a task question
    output_len: int
    budget: int | None = None    # thinking budget of a thinking request (None: unlimited)


@dataclass(frozen=True)
class WorkloadConfig:
    num_prompts: int = 100
    dataset: str = "random"      # "random" | "tasks"
    input_len: int = 64
    output_len: int = 64
    thinking_output_len: int | None = None  # a thinking request's output length (None: output_len)
    range_ratio: float = 0.0     # lengths uniform in [len * (1 - r), len * (1 + r)], as vLLM's random dataset
    thinking_share: float = 0.0  # fraction of requests in thinking mode
    thinking_budgets: tuple[int | None, ...] = (None,)  # a thinking request's budget is drawn from these
    seed: int = 0


def _length(rng: random.Random, n: int, ratio: float) -> int:
    return max(1, rng.randint(int(n * (1 - ratio)), int(n * (1 + ratio))))


def make_workload(cfg: WorkloadConfig, vocab_size: int, decode: Callable[[list[int]], str]) -> list[RequestSpec]:
    """`decode(ids) -> str` turns random prompt ids into text for the chat APIs."""
    rng = random.Random(cfg.seed)
    questions: list[str] = []
    if cfg.dataset == "tasks":
        from deployments.tools.tasks import KINDS, eval_set

        per_kind = max(1, -(-cfg.num_prompts // len(KINDS)))
        questions = [t.question for t in eval_set(per_kind=per_kind, seed=cfg.seed)]
        rng.shuffle(questions)
    elif cfg.dataset != "random":
        raise ValueError(f"dataset: '{cfg.dataset}' is not one of random, tasks")
    specs = []
    for i in range(cfg.num_prompts):
        thinking = rng.random() < cfg.thinking_share
        budget = rng.choice(cfg.thinking_budgets) if thinking else None
        out_len = _length(rng, (cfg.thinking_output_len or cfg.output_len) if thinking else cfg.output_len,
                          cfg.range_ratio)
        if cfg.dataset == "random":
            # Ids from the ordinary range of the vocabulary: no special or control tokens.
            ids = [rng.randrange(0, min(vocab_size, 151643)) for _ in range(_length(rng, cfg.input_len, cfg.range_ratio))]
            specs.append(RequestSpec(i, "thinking" if thinking else "no-think", ids, decode(ids), out_len, budget))
        else:
            specs.append(RequestSpec(i, "thinking" if thinking else "no-think", None, questions[i % len(questions)],
                                     out_len, budget))
    return specs


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process at `rate` per
    second (exponential gaps), or all at once for rate inf (then the concurrency limit paces)."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
