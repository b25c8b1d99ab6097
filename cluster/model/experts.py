"""Routed experts: SwiGLU over rows grouped by expert (per-expert matmuls or one padded batched
matmul, never a loop over tokens), and `LocalExperts`, all of a layer's experts in this process.
Expert weights are input-major: w_gate_up [E, H, 2I] (gate then up), w_down [E, I, H]."""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import nn

from cluster import native
from cluster.config import ModelConfig
from cluster.model.layers import silu_mul

log = logging.getLogger(__name__)


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: x [N, H], w_gate_up [H, 2I], w_down [I, H] (input-major, see LocalExperts)."""
    return silu_mul(x @ w_gate_up) @ w_down


def use_padded(counts: list[int], n: int) -> bool:
    """Whether one padded batched matmul over all experts beats one matmul per expert.

    With few rows per expert (decode) per-expert calls cost more than their arithmetic, so
    padding every expert to the fullest one pays off while most experts are hit and the padding
    wastes little. From about 64 rows per expert on (prefill), per-expert matmuls are as fast
    and padding is pure waste (measured crossover on model (a)'s shapes, 2 cores)."""
    e = len(counts)
    cap = max(counts, default=0)
    hit = sum(1 for c in counts if c)
    return 0 < n < 64 * e and 2 * hit >= e and e * cap <= 3 * n


def padded_swiglu(
    rows: torch.Tensor, expert: torch.Tensor, slot: torch.Tensor, cap: int,
    w_gate_up: torch.Tensor, w_down: torch.Tensor,
) -> torch.Tensor:
    """All experts as one batched matmul: row r goes to padded slot `slot[r]` of expert
    `expert[r]` (each expert has `cap` slots); returns each row's expert output, in row order."""
    buf = rows.new_zeros(w_gate_up.shape[0], cap, rows.shape[1])
    buf[expert, slot] = rows
    act = silu_mul(torch.bmm(buf, w_gate_up))
    return torch.bmm(act, w_down)[expert, slot]


def grouped_swiglu(
    xs: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over rows already sorted by expert: `counts[e]` consecutive rows go to local
    expert e (weights w_gate_up [E, H, 2I], w_down [E, I, H]). Never a loop over tokens: either
    one matmul per expert over its rows, or one padded batched matmul (see `use_padded`)."""
    n = xs.shape[0]
    if use_padded(counts, n):
        counts_t = torch.tensor(counts, device=xs.device)
        expert = torch.repeat_interleave(torch.arange(len(counts), device=xs.device), counts_t)
        slot = torch.arange(n, device=xs.device) - (counts_t.cumsum(0) - counts_t)[expert]
        return padded_swiglu(xs, expert, slot, max(counts), w_gate_up, w_down)
    out = torch.empty_like(xs)
    start = 0
    for i, rows in enumerate(counts):
        if rows:
            out[start : start + rows] = swiglu(xs[start : start + rows], w_gate_up[i], w_down[i])
            start += rows
    return out


def group_offsets(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of flattened ids by expert, and each expert's end offset in that order
    (int32, on the device): what a grouped matmul takes, with no read of the counts to the host."""
    flat = ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return flat.argsort(stable=True), counts.cumsum(0, dtype=torch.int32)


def grouped_swiglu_offsets(
    xs: torch.Tensor, offs: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert, expert e taking rows offs[e-1]..offs[e]: two
    grouped matmuls (torch._grouped_mm), the group sizes staying on the device."""
    gate_up = torch._grouped_mm(xs, w_gate_up, offs=offs)
    return torch._grouped_mm(silu_mul(gate_up), w_down, offs=offs)


@functools.cache
def grouped_mm_available(device: str, dtype: torch.dtype) -> bool:
    """Whether the sync-free grouped path runs here: on CUDA (on the CPU the native kernel or the
    paths below, measured faster, run), and a one-time probe against per-expert matmuls agrees
    (the CUDA kernel wants bf16 and compute capability 9.0+; any error or mismatch means no)."""
    if not device.startswith("cuda") or not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        w_gate_up = torch.randn(4, 64, 64, device=device, generator=gen).to(dtype) / 8
        w_down = torch.randn(4, 32, 64, device=device, generator=gen).to(dtype) / 8
        xs = torch.randn(40, 64, device=device, generator=gen).to(dtype)
        offs = torch.tensor([7, 7, 30, 40], dtype=torch.int32, device=device)
        got = grouped_swiglu_offsets(xs, offs, w_gate_up, w_down).float()
        want = grouped_swiglu(xs, [7, 0, 23, 10], w_gate_up, w_down).float()
        ok = bool(((got - want).norm() / want.norm()).item() < 2e-2)
        if not ok:
            log.warning("grouped matmul disagrees with per-expert matmuls on %s; experts read their counts", device)
        return ok
    except Exception as exc:  # noqa: BLE001 - any failure means the count-reading paths
        log.warning("grouped matmul unavailable on %s for %s (%r); experts read their counts", device, dtype, exc)
        return False


def unsort_weighted_sum(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's routing-weighted sum of its k expert outputs, from `out`, rows in the order
    `order` gives (row j is flat (token, slot) pair order[j]): the rows go back to (token, slot)
    order (unique indices, no accumulation) and one batched matmul sums each token's k. The sum's
    order is fixed, unlike a GPU's index_add_, which adds with atomics in no fixed order (bf16 sums
    that change from run to run change greedy tokens)."""
    t, k = weights.shape
    back = torch.empty_like(out)
    back[order] = out
    return torch.bmm(weights.unsqueeze(1).to(out.dtype), back.view(t, k, out.shape[1])).squeeze(1)


def weighted_sum_back(x: torch.Tensor, out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`unsort_weighted_sum` for rows sorted by expert; on the CPU index_add_ in expert order
    instead (deterministic there, and transformers' order of summation, which the float32
    comparisons with it rely on)."""
    if not x.is_cpu:
        return unsort_weighted_sum(out, order, weights)
    out.mul_(weights.reshape(-1)[order, None].to(out.dtype))
    return torch.zeros_like(x).index_add_(0, order // weights.shape[1], out)


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Stable order of flattened (token, slot) pairs by expert id, and the count per expert."""
    flat = ids.reshape(-1)
    return flat.argsort(stable=True), torch.bincount(flat, minlength=num_experts).tolist()


class LocalExperts(nn.Module):
    """All experts of one layer held in this process (single-process engine). Weights are
    input-major: w_gate_up [E, H, 2I] (gate then up), w_down [E, I, H].

    On CPU the native fused kernel runs them when it is built (cluster/native; measured 2-3x
    faster than the PyTorch path at every batch size in float32). The PyTorch path picks, by
    batch size, the way with the fewest kernel launches: one token runs its k experts directly;
    a decode batch goes into the padded batched matmul without sorting (each pair's slot is its
    rank among the pairs of its expert); large batches are sorted by expert and run one matmul
    per expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w_gate_up = nn.Parameter(torch.empty(e, h, 2 * i))
        self.w_down = nn.Parameter(torch.empty(e, i, h))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if (kernels := native.for_tensor(x)) is not None:
            return kernels.moe_experts(x, ids, weights, self.w_gate_up, self.w_down)
        return self.forward_torch(x, ids, weights)

    def forward_torch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The PyTorch path (and the native kernel's reference). On a GPU where the grouped
        matmul runs, that (no host sync); else the way with the fewest kernel launches."""
        if grouped_mm_available(str(x.device), x.dtype):
            return self.forward_grouped(x, ids, weights)
        t, k = ids.shape
        if t == 1:
            ys = torch.cat([swiglu(x, self.w_gate_up[e], self.w_down[e]) for e in ids[0].tolist()])
            return weights @ ys
        e, n = self.w_gate_up.shape[0], t * k
        flat = ids.reshape(-1)
        if n < 64 * e:
            rank = torch.zeros(n, e, dtype=torch.int32, device=x.device).scatter_(1, flat[:, None], 1).cumsum_(0)
            counts = rank[-1].tolist()
            if use_padded(counts, n):
                slot = rank.gather(1, flat[:, None]).squeeze(1).sub_(1)
                y = padded_swiglu(x.repeat_interleave(k, 0), flat, slot, max(counts), self.w_gate_up, self.w_down)
                return torch.bmm(weights[:, None], y.view(t, k, -1)).squeeze(1)
        order, counts = sort_by_expert(ids, e)
        token = order // k
        out = grouped_swiglu(x[token], counts, self.w_gate_up, self.w_down)
        out.mul_(weights.reshape(-1)[order, None])
        return torch.zeros_like(x).index_add_(0, token, out)

    def fused(self, gpu: ModuleType, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              valid: torch.Tensor | None, usage: torch.Tensor) -> torch.Tensor:
        """The grouped Triton kernel (cluster/kernels/gpu/moe.py): block-aligned expert segments,
        gate/up with the SwiGLU epilogue, down with the routing weight, usage counted on the way."""
        return gpu.fused_moe(x, ids, weights, self.w_gate_up, self.w_down, valid=valid, usage=usage)

    def forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sorted by expert on the device, two grouped matmuls, weighted sum back per token:
        nothing read to the host."""
        order, offs = group_offsets(ids, self.w_gate_up.shape[0])
        out = grouped_swiglu_offsets(x[order // ids.shape[1]], offs, self.w_gate_up, self.w_down)
        return weighted_sum_back(x, out, order, weights)
