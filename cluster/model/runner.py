"""Runs the model on one step plan: builds the flat inputs and attention metadata from the
block tables, runs the forward, computes logits only for rows that sample, and samples. It is
the whole single-process engine's executor, and the core of each attention-shard actor.

With `static_decode`, pure-decode steps run on static buffers instead (graphs.py), with no host
sync but the read of the sampled ids, and with `cuda_graphs` they replay a graph per batch
bucket; prefill, mixed and over-bucket steps take the eager path below."""

from __future__ import annotations

import torch

from cluster.model.attention import AttentionMetadata, PrefillChunk
from cluster.config import ModelConfig
from cluster.model.graphs import StaticDecode, is_pure_decode
from cluster.model.layers import rope_tables
from cluster.model.memory import MemoryReport, measure
from cluster.model.qwen3_moe import Qwen3MoeModel, SparseMoe
from cluster.engine.plan import Sampled, StepPlan
from cluster.model.profiler import section
from cluster.model.logits import apply_token_bitmask, process_logits
from cluster.model.sampler import sample


class ModelRunner:
    def __init__(
        self, model: Qwen3MoeModel, cfg: ModelConfig, num_blocks: int, block_size: int,
        max_model_len: int, dtype: torch.dtype, device: str = "cpu", static_decode: bool = False,
        cuda_graphs: bool = False, max_batch: int = 64,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        cos, sin = rope_tables(cfg, max_model_len)
        self.cos = cos.to(device=device, dtype=dtype).unsqueeze(1)
        self.sin = sin.to(device=device, dtype=dtype).unsqueeze(1)
        self.generators: dict[str, torch.Generator] = {}  # per-request, for seeded sampling
        self.cuda_graphs = cuda_graphs
        self.sync_free = static_decode or cuda_graphs
        self.static: StaticDecode | None = None
        if self.sync_free:
            self.static = StaticDecode(model, self.cos, self.sin, max_batch, max_model_len, block_size,
                                       scratch_block=num_blocks, device=device)
        self._allocate(num_blocks)

    def prepare(self, plan: StepPlan) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, attention metadata and the rows whose logits are sampled."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for e in plan.entries:
            n = len(e.token_ids)
            end = e.start + n
            row = len(ids)
            ids.extend(e.token_ids)
            positions.extend(range(e.start, end))
            table = e.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(e.start, end))
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(row, n, end, torch.tensor(table, device=self.device)))
            if e.params is not None:
                sample_rows.append(row + n - 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            cos=self.cos[pos], sin=self.sin[pos], num_decodes=len(decode_tables), prefills=prefills,
        )
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in decode_tables], device=self.device
            )
            meta.decode_lens = lens = torch.tensor(decode_lens, device=self.device)
            # Additive, in the model's dtype: attention would otherwise convert a boolean mask per layer.
            pad = torch.arange(width * bs, device=self.device) >= lens[:, None]
            meta.decode_mask = torch.zeros(pad.shape, dtype=self.dtype, device=self.device).masked_fill_(pad, float("-inf"))[:, None, None, :]
        return torch.tensor(ids, dtype=torch.long, device=self.device), meta, sample_rows

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[Sampled]:
        """One forward over the plan; returns a token for each entry that samples."""
        for rid in plan.finished:
            self.generators.pop(rid, None)
        if self.static is not None and is_pure_decode(plan) and self.static.bucket(len(plan.entries)):
            logits = self.static.run(plan)
            return list(self._sample(plan, logits).values())
        input_ids, meta, rows = self.prepare(plan)
        hidden = self.model(input_ids, meta)
        results: dict[str, Sampled] = self._sample(plan, self.model.compute_logits(hidden[rows])) if rows else {}
        row = 0
        for e in plan.entries:
            if e.prompt_targets:
                r = results.setdefault(e.request_id, Sampled(e.request_id, None, None))
                r.prompt_start = e.start + 1
                r.prompt_logprobs, r.prompt_top_logprobs = self._prompt_logprobs(hidden, row, e.prompt_targets, e.prompt_top)
            row += len(e.token_ids)
        return list(results.values())

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> dict[str, Sampled]:
        """Samples a token for each entry that samples, from its row of `logits` (the step's
        logits, whichever path made them: every sampled token comes through here)."""
        entries = [e for e in plan.entries if e.params is not None]
        params = [e.params for e in entries]
        gens = [self._generator(e.request_id, p.seed) if p.seed is not None else None
                for e, p in zip(entries, params)]
        with section("sampling"):
            processed = process_logits(logits, params, [e.output_token_ids for e in entries],  # type: ignore[arg-type]
                                       [e.prompt_token_ids for e in entries])
            masked = [i for i, e in enumerate(entries) if e.token_bitmask is not None]
            if masked:
                with section("structured_mask"):
                    if processed.data_ptr() == logits.data_ptr() and any(p.logprobs for p in params):
                        processed = processed.clone()  # the raw logits give the logprobs
                    apply_token_bitmask(processed, masked, [entries[i].token_bitmask for i in masked])
            tokens, lps, tops = sample(processed, params, gens, raw=logits, sync_free=self.sync_free)  # type: ignore[arg-type]
        return {e.request_id: Sampled(e.request_id, t, lp, top) for e, t, lp, top in zip(entries, tokens, lps, tops)}

    # Rows of prompt logits computed at once: [rows, vocab] float32 is 78 MB at 128 rows of Qwen3's vocabulary.
    PROMPT_LOGPROB_ROWS = 128

    def _prompt_logprobs(self, hidden: torch.Tensor, row: int, targets: list[int], top: int
                         ) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
        """Logprob of each target token from the position before it (rows row.. of `hidden`),
        and the `top` most likely tokens there, a slice of rows at a time."""
        values: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        want = torch.tensor(targets, device=hidden.device)
        for a in range(0, len(targets), self.PROMPT_LOGPROB_ROWS):
            b = min(a + self.PROMPT_LOGPROB_ROWS, len(targets))
            logp = torch.log_softmax(self.model.compute_logits(hidden[row + a : row + b]).float(), dim=-1)
            values += logp.gather(1, want[a:b, None]).squeeze(1).tolist()
            if top:
                v, i = logp.topk(top, dim=-1)
                tops += [list(zip(ti, vi)) for ti, vi in zip(i.tolist(), v.tolist())]
        return values, tops if top else None

    def memory_report(self) -> MemoryReport:
        """The device's memory after a profile step (CUDA only)."""
        return measure(self.device)

    def _allocate(self, num_blocks: int) -> None:
        """A KV cache of `num_blocks` (the old one freed first), plus the static step's scratch
        block after them (which no sequence owns), and the decode graphs captured over it."""
        if self.static is not None:
            self.static.release()  # the graphs point into the old cache
        self.model.allocate_kv_cache(0, self.block_size, self.dtype, self.device)
        if self.static is None:
            self.model.allocate_kv_cache(num_blocks, self.block_size, self.dtype, self.device)
            return
        self.model.allocate_kv_cache(num_blocks + 1, self.block_size, self.dtype, self.device)
        self.static.scratch_block = num_blocks
        if self.cuda_graphs:
            with torch.inference_mode():
                self.static.capture()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Replaces the (profile-sized) KV cache with one of `num_blocks`, and forgets what the
        profile step left behind (expert counts, seeded generators)."""
        self._allocate(num_blocks)
        self.generators.clear()
        for m in self.model.modules():
            if isinstance(m, SparseMoe):
                m.usage.zero_()

    def _generator(self, rid: str, seed: int) -> torch.Generator:
        g = self.generators.get(rid)
        if g is None:
            g = self.generators[rid] = torch.Generator(device=self.device).manual_seed(seed)
        return g
