"""The token exchange between attention shards and expert groups: the only module that knows
the all_to_all protocol.

Ranks 0..A-1 are attention shards, A..A+E-1 expert groups, all in one process group. Per MoE
layer every rank takes part in three `all_to_all_single` calls, in this order:

1. counts: each shard tells each group how many (token, expert) rows it sends;
2. rows: per row its hidden state and its local expert slot on the receiving group, packed as
   bytes into one tensor (so any dtype travels with its int64 slot id in one call);
3. results: the groups send each row's expert output back, in the order received.

A shard with no tokens sends empty splits; groups own no request state. A token routed to a
replicated expert goes to one of its copies (round-robin over the token's rows), so the copies
share the load. Payload per layer and shard: rows out + results back = 2 x rows x hidden x
dtype size, plus 8 bytes per row of slot ids and the counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cluster import native
from cluster.model.experts import grouped_swiglu
from cluster.parallel.placement import ExpertPlacement


@dataclass
class ExchangeStats:
    """Bytes this rank sent plus received per MoE layer ordinal, and seconds spent inside
    collectives and in expert matmuls, since the last reset."""

    hidden_bytes: list[int] = field(default_factory=list)
    index_bytes: list[int] = field(default_factory=list)
    comm_s: float = 0.0
    experts_s: float = 0.0

    def reset(self, layers: int) -> None:
        self.hidden_bytes = [0] * layers
        self.index_bytes = [0] * layers
        self.comm_s = self.experts_s = 0.0


def pack_rows(rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[N, H] hidden states + [N] int64 slots -> [N, H*size + 8] bytes, one message."""
    as_bytes = slots.contiguous().view(torch.uint8).view(rows.shape[0], 8)
    return torch.cat([rows.contiguous().view(torch.uint8), as_bytes], dim=1)


def unpack_rows(packed: torch.Tensor, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    body = packed[:, :-8].contiguous().view(dtype)  # viewing bytes as dtype shrinks the last dim
    return body, packed[:, -8:].contiguous().view(torch.long).squeeze(1)


class Exchange:
    """One rank's end of the exchange, shard or group."""

    def __init__(self, rank: int, num_shards: int, num_groups: int, placement: ExpertPlacement, device: str) -> None:
        self.rank = rank
        self.num_shards = num_shards
        self.world = num_shards + num_groups
        self.device = device
        self.tables = [tuple(t.to(device) for t in placement.routing_tables(i)) for i in range(placement.num_layers)]
        self.stats = ExchangeStats()
        self.stats.reset(placement.num_layers)

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        start = time.perf_counter()
        dist.all_to_all_single(out, inp, out_splits, in_splits)
        self.stats.comm_s += time.perf_counter() - start

    def _counts(self, send: torch.Tensor) -> list[int]:
        recv = torch.empty_like(send)
        start = time.perf_counter()
        dist.all_to_all_single(recv, send)
        self.stats.comm_s += time.perf_counter() - start
        return recv.tolist()

    # -- attention-shard side ------------------------------------------------------------------
    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sends each (token, expert) row to the group holding that expert, returns the
        router-weighted sum of the experts' outputs per token."""
        t, k = ids.shape
        hidden = x.shape[1]
        num_copies, group_of, slot_of = self.tables[layer]
        flat = ids.reshape(-1)
        row = torch.arange(flat.numel(), device=x.device)
        copy = row % num_copies[flat]
        dest = group_of[flat, copy]
        order = dest.argsort(stable=True)
        send = torch.zeros(self.world, dtype=torch.long, device=x.device)
        send[self.num_shards:] = torch.bincount(dest, minlength=self.world - self.num_shards)
        self._counts(send)
        splits = send.tolist()
        zeros = [0] * self.world
        rows = x[order // k]
        slots = slot_of[flat, copy][order]
        packed = pack_rows(rows, slots)
        self._a2a(packed.new_empty(0, packed.shape[1]), packed, zeros, splits)
        back = x.new_empty(rows.shape)
        self._a2a(back, x.new_empty(0, hidden), splits, zeros)
        self.stats.hidden_bytes[layer] += 2 * rows.numel() * rows.element_size()
        self.stats.index_bytes[layer] += slots.numel() * slots.element_size() + 2 * send.numel() * send.element_size()
        out = torch.empty_like(back)
        out[order] = back
        return torch.bmm(weights.unsqueeze(1).to(out.dtype), out.view(t, k, hidden)).squeeze(1)

    # -- expert-group side ---------------------------------------------------------------------
    def serve(self, layer: int, w_gate_up: torch.Tensor, w_down: torch.Tensor, dtype: torch.dtype) -> None:
        """Receives every shard's rows for this layer, runs the local experts, sends results."""
        hidden = w_gate_up.shape[1]
        send = torch.zeros(self.world, dtype=torch.long, device=self.device)
        splits = self._counts(send)
        zeros = [0] * self.world
        n = sum(splits)
        width = hidden * dtype.itemsize + 8
        packed = torch.empty(n, width, dtype=torch.uint8, device=self.device)
        self._a2a(packed, packed.new_empty(0, width), splits, zeros)
        rows, slots = unpack_rows(packed, hidden, dtype)
        start = time.perf_counter()
        if (kernels := native.for_tensor(rows)) is not None:
            # The fused kernel with one "routed expert" per row and weight 1: each row's output.
            out = kernels.moe_experts(rows, slots[:, None], rows.new_ones(n, 1), w_gate_up, w_down)
        else:
            order = slots.argsort(stable=True)
            counts = torch.bincount(slots, minlength=w_gate_up.shape[0]).tolist()
            out = torch.empty_like(rows)
            out[order] = grouped_swiglu(rows[order], counts, w_gate_up, w_down)
        self.stats.experts_s += time.perf_counter() - start
        self._a2a(rows.new_empty(0, hidden), out, zeros, splits)
        self.stats.hidden_bytes[layer] += 2 * rows.numel() * rows.element_size()
        self.stats.index_bytes[layer] += slots.numel() * slots.element_size() + 2 * send.numel() * send.element_size()


class DispatchedExperts:
    """Stands in for a MoE layer's experts on an attention shard (see model.SparseMoe)."""

    def __init__(self, exchange: Exchange, layer: int) -> None:
        self.exchange = exchange
        self.layer = layer

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.exchange.dispatch(self.layer, x, ids, weights)
