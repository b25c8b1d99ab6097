"""Continuous batching with chunked prefill and preemption by recomputation.

Every sequence has `num_computed_tokens` of `num_tokens`; a step computes some of the rest. A
step first gives each running sequence its next tokens (one for a decode, a chunk for a prefill
in progress), then admits waiting sequences while the token budget and KV blocks last. When a
running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are released (they stay in the prefix cache) and it waits at the front.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cluster.config import EngineConfig, ModelConfig, SamplingParams
from cluster.engine.kv_cache import BlockManager
from cluster.engine.plan import PlanEntry, StepPlan
from cluster.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """Sequences of one step with the number of tokens each computes; single-token entries
    (decodes) come first, as the attention layout expects."""

    entries: list[tuple[Sequence, int]]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        entries: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq itself was the last running sequence and got preempted
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            entries.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and seq.params.prompt_logprobs is None:  # those compute every position
                self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                self.blocks.release(seq)  # hold nothing while waiting; the prefix stays cached
                if not self.running:  # cannot happen when the pool fits max_model_len
                    raise RuntimeError("KV pool too small for a single sequence")
                break
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            entries.append((seq, n))
            budget -= n
        entries.sort(key=lambda e: e[1] != 1)  # stable: decodes first
        return ScheduledBatch(entries)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, batch: ScheduledBatch) -> int:
        """After the step ran: each sequence's computed tokens move on and the blocks that became
        full are committed to the prefix cache. The scheduler is the one owner of that state.
        Returns the tokens computed."""
        for seq, n in batch.entries:
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
        return batch.num_tokens

    def finish(self, seq: Sequence) -> None:
        """Frees a finished or aborted sequence, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)


def plan_from_batch(batch: ScheduledBatch, block_size: int, finished: list[str]) -> StepPlan:
    entries = []
    for seq, n in batch.entries:
        start = seq.num_computed_tokens
        end = start + n
        samples = end == seq.num_tokens
        entry = PlanEntry(
            seq.request_id, seq.token_ids[start:end], start, seq.block_table[: -(-end // block_size)],
            seq.params if samples else None,
        )
        last = seq.num_prompt_tokens - 1  # the last prompt position that predicts a prompt token
        if seq.params.prompt_logprobs is not None and start < last and len(seq.prompt_logprobs) < last:
            entry.prompt_targets = seq.token_ids[start + 1 : min(end, last) + 1]
            entry.prompt_top = seq.params.prompt_logprobs
        if samples and seq.params.penalized:
            entry.output_token_ids = seq.output_token_ids
            if seq.params.repetition_penalty != 1.0:
                entry.prompt_token_ids = seq.prompt_token_ids
        entries.append(entry)
    return StepPlan(entries, finished)


def profile_plan(cfg: EngineConfig, model: ModelConfig) -> StepPlan:
    """The largest step the scheduler can make, for measuring a device's activation peak:
    max_num_batched_tokens tokens over min(max_num_seqs, tokens) sequences, each sampling, on
    blocks of their own."""
    tokens = cfg.max_num_batched_tokens
    if cfg.max_model_len:
        tokens = min(tokens, cfg.max_model_len * cfg.max_num_seqs)
    seqs = min(cfg.max_num_seqs, tokens)
    entries, next_block = [], 0
    for i in range(seqs):
        n = tokens // seqs + (i < tokens % seqs)
        blocks = -(-n // cfg.block_size)
        entries.append(PlanEntry(f"profile-{i}", [0] * n, 0, list(range(next_block, next_block + blocks)),
                                 SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, top_k=50)))
        next_block += blocks
    return StepPlan(entries, [e.request_id for e in entries])
