"""The token exchange between the ranks that hold attention and the ranks that hold experts:
the only module that knows the all_to_all protocol.

Two layouts (ParallelConfig.layout). "separate": ranks 0..A-1 are attention shards, A..A+E-1
expert groups. "colocated": rank i is attention shard i *and* expert group i (the
data-parallel-attention + expert-parallel layout of wide-EP deployments), so one GPU holds both;
NCCL allows one rank per GPU in a communicator, so sharing a GPU means sharing a rank. Every rank
runs the same three `all_to_all_single` calls per MoE layer, whatever it holds:

1. counts: each rank tells each rank how many (token, expert) rows it sends it (only ranks that
   hold experts receive any);
2. rows: per row its hidden state and its local expert slot on the receiving rank, packed as
   bytes into one tensor (so any dtype travels with its int64 slot id in one call);
3. results: each expert-holding rank runs its experts on what it received and sends each row's
   output back, in the order received.

A shard with no tokens sends empty splits; a pure expert group sends none; expert groups own no
request state. A token routed to a replicated expert goes to one of its copies (round-robin over
the token's rows), so the copies share the load. Payload per layer and rank: 2 x (rows sent +
rows received) x hidden x dtype size, plus 8 bytes per row of slot ids and the counts.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cluster import native
from cluster.model.experts import (
    group_offsets, grouped_mm_available, grouped_swiglu, grouped_swiglu_offsets, sort_by_expert,
    unsort_weighted_sum,
)
from cluster.model.fp8 import Fp8Experts
from cluster.parallel.placement import ExpertPlacement


ROWS_KEPT = 4096  # steps of per-layer expert rows a rank remembers (a bounded window)


@dataclass
class ExchangeStats:
    """Bytes this rank sent plus received per MoE layer ordinal, and seconds spent inside
    collectives and in expert matmuls, since the last reset. On a rank that holds experts,
    `expert_rows[layer]` holds the rows its experts computed in each of the last steps: every
    rank takes part in every layer's exchange of every step, so the i-th entries of all groups
    are the same step, and their maximum is what that layer's exchange waited for."""

    hidden_bytes: list[int] = field(default_factory=list)
    index_bytes: list[int] = field(default_factory=list)
    expert_rows: list[deque[int]] = field(default_factory=list)
    comm_s: float = 0.0
    experts_s: float = 0.0

    def reset(self, layers: int) -> None:
        self.hidden_bytes = [0] * layers
        self.index_bytes = [0] * layers
        self.expert_rows = [deque(maxlen=ROWS_KEPT) for _ in range(layers)]
        self.comm_s = self.experts_s = 0.0


def pack_rows(rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[N, H] hidden states + [N] int64 slots -> [N, H*size + 8] bytes, one message."""
    as_bytes = slots.contiguous().view(torch.uint8).view(rows.shape[0], 8)
    return torch.cat([rows.contiguous().view(torch.uint8), as_bytes], dim=1)


def unpack_rows(packed: torch.Tensor, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    body = packed[:, :-8].contiguous().view(dtype)  # viewing bytes as dtype shrinks the last dim
    return body, packed[:, -8:].contiguous().view(torch.long).squeeze(1)


class Exchange:
    """One rank's end of the exchange. `experts` (per MoE layer, this rank's stacked
    (w_gate_up, w_down), or its `Fp8Experts`) is set on ranks that hold an expert group."""

    def __init__(
        self, rank: int, num_shards: int, num_groups: int, placement: ExpertPlacement, device: str,
        colocated: bool = False,
    ) -> None:
        self.rank = rank
        self.world = num_shards if colocated else num_shards + num_groups
        self.device = device
        self.first = 0 if colocated else num_shards  # the rank of expert group 0; group j is rank first + j
        self.set_placement(placement)
        self.experts: list[tuple[torch.Tensor, torch.Tensor] | Fp8Experts] | None = None
        self.stats = ExchangeStats()
        self.stats.reset(placement.num_layers)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """The routing tables of `placement` (the experts themselves are the holder's business)."""
        self.placement = placement
        self.tables = [
            (copies.to(self.device), (group + self.first).to(self.device), slot.to(self.device))
            for copies, group, slot in (placement.routing_tables(i) for i in range(placement.num_layers))
        ]

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        start = time.perf_counter()
        dist.all_to_all_single(out, inp, out_splits, in_splits)
        self.stats.comm_s += time.perf_counter() - start

    def _splits(self, send: torch.Tensor) -> tuple[list[int], list[int]]:
        """Rows this rank sends to and receives from each rank: one counts exchange, and one read
        of both to the host (all_to_all needs its split sizes there)."""
        recv = torch.empty_like(send)
        start = time.perf_counter()
        dist.all_to_all_single(recv, send)
        self.stats.comm_s += time.perf_counter() - start
        both = torch.cat([send, recv]).tolist()
        return both[: self.world], both[self.world :]

    def _exchange(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, send: torch.Tensor) -> torch.Tensor:
        """Sends `rows` (sorted by destination rank, `send[r]` of them to rank r), serves what
        arrives with this rank's experts, and returns the outputs of the rows sent, in order."""
        hidden, dtype = rows.shape[1], rows.dtype
        sent, received = self._splits(send)
        n = sum(received)
        packed = torch.empty(n, hidden * dtype.itemsize + 8, dtype=torch.uint8, device=rows.device)
        self._a2a(packed, pack_rows(rows, slots), received, sent)
        if n:
            if self.experts is None:
                raise RuntimeError(f"exchange: rank {self.rank} holds no experts but was sent {n} rows")
            out = self._run_experts(layer, *unpack_rows(packed, hidden, dtype))
        else:
            out = rows.new_empty(0, hidden)
        if self.experts is not None:
            self.stats.expert_rows[layer].append(n)
        back = rows.new_empty(rows.shape)
        self._a2a(back, out, sent, received)
        moved = sum(sent) + n
        self.stats.hidden_bytes[layer] += 2 * moved * hidden * dtype.itemsize
        self.stats.index_bytes[layer] += moved * 8 + 2 * send.numel() * send.element_size()
        return back

    def _run_experts(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each received row through its local expert slot."""
        stack = self.experts[layer]  # type: ignore[index]
        start = time.perf_counter()
        out = torch.empty_like(rows)
        if isinstance(stack, Fp8Experts):
            order, counts = sort_by_expert(slots, stack.num_slots)
            out[order] = stack.run_sorted(rows[order], counts)
        elif (kernels := native.for_tensor(rows)) is not None:
            # The fused kernel with one "routed expert" per row and weight 1: each row's output.
            out = kernels.moe_experts(rows, slots[:, None], rows.new_ones(rows.shape[0], 1), *stack)
        elif grouped_mm_available(str(rows.device), rows.dtype):  # no read of the counts to the host
            order, offs = group_offsets(slots, stack[0].shape[0])
            out[order] = grouped_swiglu_offsets(rows[order], offs, *stack)
        else:
            order, counts = sort_by_expert(slots, stack[0].shape[0])
            out[order] = grouped_swiglu(rows[order], counts, *stack)
        self.stats.experts_s += time.perf_counter() - start
        return out

    # -- attention-shard side (in the colocated layout, this serves too) -------------------------
    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sends each (token, expert) row to the rank holding that expert, returns the
        router-weighted sum of the experts' outputs per token."""
        t, k = ids.shape
        num_copies, rank_of, slot_of = self.tables[layer]
        flat = ids.reshape(-1)
        copy = torch.arange(flat.numel(), device=x.device) % num_copies[flat]
        dest = rank_of[flat, copy]
        order = dest.argsort(stable=True)
        send = torch.zeros(self.world, dtype=torch.long, device=x.device).index_add_(0, dest, torch.ones_like(dest))
        back = self._exchange(layer, x[order // k], slot_of[flat, copy][order], send)
        return unsort_weighted_sum(back, order, weights)

    # -- expert-group side (separate layout) ---------------------------------------------------
    def serve(self, layer: int, dtype: torch.dtype) -> None:
        """Receives every shard's rows for this layer, runs the local experts, sends results."""
        stack = self.experts[layer]  # type: ignore[index]
        hidden = stack.gate.q.shape[-1] if isinstance(stack, Fp8Experts) else stack[0].shape[1]
        none = torch.zeros(self.world, dtype=torch.long, device=self.device)
        self._exchange(layer, torch.empty(0, hidden, dtype=dtype, device=self.device),
                       torch.empty(0, dtype=torch.long, device=self.device), none)


class DispatchedExperts:
    """Stands in for a MoE layer's experts on an attention shard (see model.SparseMoe)."""

    def __init__(self, exchange: Exchange, layer: int) -> None:
        self.exchange = exchange
        self.layer = layer

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.exchange.dispatch(self.layer, x, ids, weights)
