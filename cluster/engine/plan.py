"""What one step asks of an attention shard, in plain data that pickles cheaply across Ray:
per sequence the tokens to compute, where they start, its block table, and whether (and how)
to sample. The scheduler's state stays in the engine; shards only see plans. This is the
contract between the engine and whatever executes it, so it imports nothing of either: the
model runner reads it without importing the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.config import SamplingParams


@dataclass
class PlanEntry:
    request_id: str
    token_ids: list[int]          # the tokens computed this step
    start: int                    # position of the first of them
    block_table: list[int]        # blocks covering start + len(token_ids)
    params: SamplingParams | None  # set when the step ends at the sequence's last token: sample
    # For a sampling entry with penalties: the tokens generated so far, and (repetition penalty
    # only) the prompt's. Plain lists, sent only for such requests.
    output_token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    # For a request that asked for prompt logprobs, while its prompt is computed: the prompt
    # tokens that this entry's positions predict (position p predicts token p + 1), and how many
    # alternatives to return for each.
    prompt_targets: list[int] | None = None
    prompt_top: int = 0
    # Structured output: the tokens allowed next, 32 to an int32 word (cluster/engine/structured.py).
    token_bitmask: Any = None


@dataclass
class StepPlan:
    entries: list[PlanEntry] = field(default_factory=list)  # single-token entries first
    finished: list[str] = field(default_factory=list)       # requests the shard may forget


@dataclass
class Sampled:
    """A step's result for one request: the sampled token (None for a prompt chunk that only
    returns prompt logprobs) and what was asked along with it."""

    request_id: str
    token: int | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None = None  # when the request asked for alternatives
    # Logprobs of prompt tokens `prompt_start` .. (with alternatives when asked), computed this step.
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_start: int = 0

