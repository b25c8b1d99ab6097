"""Runs the model on one scheduled batch: builds the flat inputs and attention metadata from
the sequences' block tables, runs the forward, computes logits only for rows that sample, and
samples. The attention shard of the expert-parallel engine is this runner plus a dispatcher."""

from __future__ import annotations

import torch

from cluster.attention import AttentionMetadata, PrefillChunk
from cluster.config import ModelConfig
from cluster.model import Qwen3MoeModel, rope_tables
from cluster.profiler import section
from cluster.sampler import sample
from cluster.scheduler import ScheduledBatch
from cluster.sequence import Sequence


class ModelRunner:
    def __init__(
        self, model: Qwen3MoeModel, cfg: ModelConfig, num_blocks: int, block_size: int,
        max_model_len: int, dtype: torch.dtype, device: str = "cpu",
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        model.allocate_kv_cache(num_blocks, block_size, dtype, device)
        cos, sin = rope_tables(cfg, max_model_len)
        self.cos = cos.to(device=device, dtype=dtype).unsqueeze(1)
        self.sin = sin.to(device=device, dtype=dtype).unsqueeze(1)
        self.last_logits: torch.Tensor | None = None  # logits of the last step's sampled rows

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, positions, attention metadata and the rows whose logits are sampled."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for seq, n in batch.entries:
            start = seq.num_computed_tokens
            end = start + n
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                decode_tables.append(table[: (end + bs - 1) // bs])
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(row, n, end, torch.tensor(table[: (end + bs - 1) // bs])))
            if end == seq.num_tokens:
                sample_rows.append(row + n - 1)
        pos = torch.tensor(positions, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            cos=self.cos[pos], sin=self.sin[pos], num_decodes=len(decode_tables), prefills=prefills,
        )
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in decode_tables], device=self.device
            )
            lens = torch.tensor(decode_lens, device=self.device)
            meta.decode_mask = (torch.arange(width * bs, device=self.device) < lens[:, None])[:, None, None, :]
        return torch.tensor(ids, device=self.device), pos, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[tuple[Sequence, int, float | None]]:
        """One forward over the batch; returns (sequence, sampled token, logprob) for each
        sequence whose scheduled tokens reach its end."""
        input_ids, _, meta, rows = self.prepare(batch)
        hidden = self.model(input_ids, meta)
        if not rows:
            self.last_logits = None
            return []
        logits = self.model.compute_logits(hidden[rows])
        self.last_logits = logits
        seqs = [seq for seq, n in batch.entries if seq.num_computed_tokens + n == seq.num_tokens]
        with section("sampling"):
            tokens, lps = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return list(zip(seqs, tokens, lps))
