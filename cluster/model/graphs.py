"""Pure-decode steps on static buffers, replayed as CUDA graphs (nano-vllm's and vLLM's scheme).

A decode step's shapes are fixed by its batch-size bucket (1, 2, 4, 8, then every 16): inputs
live in one persistent `StagingBuffer` sized for the largest bucket, filled on the host and sent
in one non-blocking copy; block tables keep their full width (max_model_len / block_size), so
their shape never changes as sequences grow; lengths and slots are device tensors. The rows of a
bucket past the batch are padding: their token is 0, they write their KV into a scratch block
that no sequence owns, attend to that one slot, and count no expert usage (`row_mask`). Nothing
in the forward reads the device, so on CUDA each bucket's forward (model and lm_head) is captured
once, largest first, into one shared memory pool, and a step is the copy plus one replay."""

from __future__ import annotations

import torch

from cluster.engine.plan import StepPlan
from cluster.model.attention import AttentionMetadata
from cluster.model.qwen3_moe import Qwen3MoeModel
from cluster.model.staging import StagingBuffer


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_batch` (which is always one)."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return sorted({*small, *range(16, max_batch, 16), max_batch})


def is_pure_decode(plan: StepPlan) -> bool:
    """One new token per sequence, each sampled, no prompt logprobs: what the static step runs."""
    return bool(plan.entries) and all(
        len(e.token_ids) == 1 and e.params is not None and not e.prompt_targets for e in plan.entries)


class StaticDecode:
    """The static buffers of pure-decode steps, their forward per bucket, and (on CUDA, when
    `capture` is called) a graph per bucket."""

    def __init__(self, model: Qwen3MoeModel, cos: torch.Tensor, sin: torch.Tensor, max_batch: int,
                 max_model_len: int, block_size: int, scratch_block: int, device: str | torch.device) -> None:
        self.model = model
        self.cos, self.sin = cos, sin  # [max_len, 1, head_dim] tables in the model's dtype
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch
        self.width = -(-max_model_len // block_size)
        b = max_batch
        self.buf = StagingBuffer([
            ("ids", (b,), torch.int64), ("positions", (b,), torch.int64), ("slots", (b,), torch.int64),
            ("lens", (b,), torch.int32), ("row_mask", (b,), torch.float32), ("tables", (b, self.width), torch.int32),
        ], device)
        self._np = {name: self.buf.host(name).numpy() for name in self.buf.specs}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._fill_padding(0, b)

    def bucket(self, n: int) -> int | None:
        """The smallest bucket that holds n rows; None beyond the largest (such a step runs eagerly)."""
        return next((b for b in self.buckets if b >= n), None)

    def _fill_padding(self, start: int, end: int) -> None:
        np_ = self._np
        np_["ids"][start:end] = 0
        np_["positions"][start:end] = 0
        np_["slots"][start:end] = self.scratch_block * self.block_size
        np_["lens"][start:end] = 1
        np_["row_mask"][start:end] = 0.0
        np_["tables"][start:end] = self.scratch_block

    def fill(self, plan: StepPlan) -> int:
        """Writes the plan's rows (and padding up to its bucket) into the staging buffer and sends
        them in one copy. Returns the bucket. The previous step's copy is done by now: each step
        ends with a read of its sampled ids, which waits for the stream."""
        n = len(plan.entries)
        b = self.bucket(n)
        assert b is not None, "fill: batch beyond the largest bucket"
        np_, bs = self._np, self.block_size
        for i, e in enumerate(plan.entries):
            p = e.start
            np_["ids"][i] = e.token_ids[0]
            np_["positions"][i] = p
            np_["slots"][i] = e.block_table[p // bs] * bs + p % bs
            np_["lens"][i] = p + 1
            table = e.block_table
            np_["tables"][i, : len(table)] = table
            np_["tables"][i, len(table):] = self.scratch_block
        np_["row_mask"][:n] = 1.0
        self._fill_padding(n, b)
        self.buf.upload(self.buf.end_of("tables", b))
        return b

    def forward(self, b: int) -> torch.Tensor:
        """The first b rows through the model and the lm_head: logits [b, vocab]. Only device
        work on fixed addresses, so it can be captured."""
        dev = self.buf.device
        ids, pos = dev("ids")[:b], dev("positions")[:b]
        tables, lens = dev("tables")[:b], dev("lens")[:b]
        if not tables.is_cuda:  # the CPU's native kernel reads int64 tables
            tables, lens = tables.long(), lens.long()
        meta = AttentionMetadata(
            slot_mapping=dev("slots")[:b], cos=self.cos[pos], sin=self.sin[pos], num_decodes=b,
            decode_block_tables=tables, decode_lens=lens, row_mask=dev("row_mask")[:b],
        )
        return self.model.compute_logits(self.model(ids, meta))

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [n, vocab] of the plan's rows: the bucket's graph replayed, or its forward run."""
        b = self.fill(plan)
        graph = self.graphs.get(b)
        if graph is None:
            return self.forward(b)[: len(plan.entries)]
        graph[0].replay()
        return graph[1][: len(plan.entries)]

    def capture(self) -> None:
        """One graph per bucket, largest first, all in one memory pool (a smaller bucket's
        activations fit in what the larger one left). Each bucket runs once eagerly before its
        capture, so that one-time work (Triton compiles, probes that read the device) is done.
        The buffers hold padding rows throughout: capture writes only the scratch block and counts
        no usage."""
        self.release()
        self._fill_padding(0, self.max_batch)
        self.buf.upload()
        torch.cuda.synchronize()
        pool = None
        for b in sorted(self.buckets, reverse=True):
            self.forward(b)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(b)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()

    def release(self) -> None:
        """Drops the graphs (before the KV cache they point into is replaced)."""
        self.graphs.clear()
