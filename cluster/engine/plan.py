"""What one step asks of an attention shard, in plain data that pickles cheaply across Ray:
per sequence the tokens to compute, where they start, its block table, and whether (and how)
to sample. The scheduler's state stays in the engine; shards only see plans."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config import SamplingParams
from cluster.engine.scheduler import ScheduledBatch


@dataclass
class PlanEntry:
    request_id: str
    token_ids: list[int]          # the tokens computed this step
    start: int                    # position of the first of them
    block_table: list[int]        # blocks covering start + len(token_ids)
    params: SamplingParams | None  # set when the step ends at the sequence's last token: sample


@dataclass
class StepPlan:
    entries: list[PlanEntry] = field(default_factory=list)  # single-token entries first
    finished: list[str] = field(default_factory=list)       # requests the shard may forget


@dataclass
class Sampled:
    request_id: str
    token: int
    logprob: float | None


def plan_from_batch(batch: ScheduledBatch, block_size: int, finished: list[str]) -> StepPlan:
    entries = []
    for seq, n in batch.entries:
        start = seq.num_computed_tokens
        end = start + n
        entries.append(PlanEntry(
            seq.request_id, seq.token_ids[start:end], start, seq.block_table[: -(-end // block_size)],
            seq.params if end == seq.num_tokens else None,
        ))
    return StepPlan(entries, finished)
