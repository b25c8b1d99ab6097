"""A training batch packed without padding: every example's tokens end to end in one row of N
positions, so the projections, the experts and the output layer see only real tokens (padding to
each length bucket's longest was ~half the positions of a step, and every chunk ran each layer's
16 experts again). Only attention needs a [batch, time] layout: its `groups` lay the packed rows
out padded per group of similar lengths, and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Packed:
    ids: torch.Tensor  # [N] compact ids: each example's ids[:-1], end to end
    pos: torch.Tensor  # [N] each position's place in its example (rope)
    learned: torch.Tensor  # [M] the positions whose next token is learned
    targets: torch.Tensor  # [M] those next tokens (compact ids)
    to_pad: torch.Tensor  # [P] the packed position at each padded slot; N (a zero row) at padding
    from_pad: torch.Tensor  # [N] each packed position's padded slot
    groups: list[tuple[int, int]]  # attention groups, in padded order: (rows, time)

    def padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [N, ...] laid out per group as [rows, time, ...] (zeros after each example's end)."""
        flat = torch.cat((x, x.new_zeros(1, *x.shape[1:]))).index_select(0, self.to_pad)
        return [g.view(b, t, *x.shape[1:]) for g, (b, t) in zip(flat.split([b * t for b, t in self.groups]), self.groups)]

    def unpadded(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of `padded` for the real positions: [rows, time, ...] per group -> [N, ...]."""
        return torch.cat([p.reshape(-1, *p.shape[2:]) for p in parts]).index_select(0, self.from_pad)


def group_bounds(lengths: list[int], n: int) -> list[int]:
    """Cut points splitting `lengths` (ascending) into at most n contiguous runs so that attention's
    padded work, sum of rows x time^2 per run, is least (a small dynamic programme)."""
    size = len(lengths)
    n = max(1, min(n, size))
    best = [[math.inf] * (size + 1) for _ in range(n + 1)]
    cut = [[0] * (size + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for end in range(1, size + 1):
            for start in range(k - 1, end):
                cost = best[k - 1][start] + (end - start) * lengths[end - 1] ** 2
                if cost < best[k][end]:
                    best[k][end], cut[k][end] = cost, start
    k = min(range(1, n + 1), key=lambda k: best[k][size])
    bounds, end = [size], size
    for level in range(k, 0, -1):
        end = cut[level][end]
        bounds.append(end)
    return bounds[::-1]


def pack(rows: list[list[int]], learn: list[list[bool]], groups: int = 8) -> Packed:
    """rows: each example's compact ids; learn[i][j]: rows[i][j] is a target. Examples are grouped
    for attention by length (sorted here; the packed order is the sorted one)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rows, learn = [rows[i] for i in order], [learn[i] for i in order]
    lengths = [len(r) - 1 for r in rows]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    total = starts[-1]
    ids = torch.tensor([t for r in rows for t in r[:-1]], dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in lengths])
    learned, targets = [], []
    for r, l, s in zip(rows, learn, starts):
        for j in range(1, len(r)):
            if l[j]:
                learned.append(s + j - 1)
                targets.append(r[j])
    to_pad, from_pad, shape = [], [0] * total, []
    bounds = group_bounds(lengths, groups)
    for lo, hi in zip(bounds, bounds[1:]):
        width = lengths[hi - 1]
        for i in range(lo, hi):
            base = len(to_pad)
            for j in range(lengths[i]):
                from_pad[starts[i] + j] = base + j
            to_pad.extend(range(starts[i], starts[i] + lengths[i]))
            to_pad.extend([total] * (width - lengths[i]))
        shape.append((hi - lo, width))
    return Packed(ids, pos, torch.tensor(learned, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                  torch.tensor(to_pad, dtype=torch.long), torch.tensor(from_pad, dtype=torch.long), shape)
