"""The grouped MoE Triton kernels (cluster/kernels/gpu/moe.py) against per-expert PyTorch: float32
throughout (the interpreter is exact there, not for bf16), FP8 weights dequantized as the loader
does. Shapes are tiny: the interpreter runs every program in numpy."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.kernels.gpu.moe import capacity, fused_moe, fused_moe_fp8, moe_align
from cluster.model.checkpoint import Fp8Tensor, dequantize_fp8, scale_shape
from cluster.model.experts import swiglu

TILES = dict(block_n=32, block_k=32)


def routing(t: int, k: int, e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives) and renormalised weights."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen) + 0.1
    return ids, w / w.sum(1, keepdim=True)


def reference(x, ids, weights, w_gate_up, w_down, valid=None) -> torch.Tensor:
    """Per-expert SwiGLU over the rows that picked it, weighted and summed per token."""
    out = torch.zeros_like(x)
    t, k = ids.shape
    for e in range(w_gate_up.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if valid is not None:
            keep = valid[tok]
            tok, slot = tok[keep], slot[keep]
        if len(tok):
            y = swiglu(x[tok], w_gate_up[e], w_down[e])
            out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


def dense_weights(e: int, h: int, i: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(e, h, 2 * i, generator=gen) / h**0.5, torch.randn(e, i, h, generator=gen) / i**0.5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def check_align(ids: torch.Tensor, e: int, bm: int, valid: torch.Tensor | None = None) -> None:
    t, k = ids.shape
    n = t * k
    pairs, block_expert, num_blocks = moe_align(ids, e, bm, valid)
    cap = capacity(n, e, bm)
    assert pairs.dtype == block_expert.dtype == num_blocks.dtype == torch.int32
    assert pairs.shape == (cap,) and cap % bm == 0 and cap >= n + e * (bm - 1)
    assert block_expert.shape == (cap // bm,) and num_blocks.shape == (1,)
    nb = int(num_blocks)
    flat = ids.reshape(-1)
    keep = torch.ones(n, dtype=torch.bool) if valid is None else valid.repeat_interleave(k)
    # every valid pair exactly once, nothing else but padding
    real = pairs[pairs != n].long()
    assert sorted(real.tolist()) == torch.arange(n)[keep].tolist()
    assert (pairs[nb * bm:] == n).all()
    assert (block_expert[nb:] == -1).all() and (block_expert[:nb] >= 0).all()
    # blocks hold only their expert's pairs; experts in ascending order, each in whole blocks
    blocks = pairs[: nb * bm].view(nb, bm).long()
    for b in range(nb):
        row = blocks[b][blocks[b] != n]
        assert (flat[row] == block_expert[b]).all()
    assert (block_expert[:nb].diff() >= 0).all()
    for ex in range(e):
        want = int(((flat == ex) & keep).sum())
        assert int((block_expert[:nb] == ex).sum()) == -(-want // bm)
        got = [p for p in real.tolist() if flat[p] == ex]
        assert got == sorted(got)  # stable within an expert


@pytest.mark.parametrize(
    "t,k,e,bm,pad",
    [(1, 1, 1, 16, False), (1, 2, 8, 16, False), (7, 2, 4, 16, True), (20, 2, 2, 16, False),
     (33, 4, 16, 4, True), (64, 8, 8, 64, True)],
)
def test_align_invariants(t, k, e, bm, pad):
    ids, _ = routing(t, k, e, seed=t)
    valid = (torch.arange(t) % 3 != 1) if pad else None
    check_align(ids, e, bm, valid)


def test_align_shapes_static_and_all_invalid():
    a, _ = routing(6, 2, 8, seed=0)
    b = torch.zeros(6, 2, dtype=torch.long)  # all on expert 0
    ra, rb = moe_align(a, 8, 16), moe_align(b, 8, 16)
    assert [x.shape for x in ra] == [x.shape for x in rb]
    pairs, block_expert, num_blocks = moe_align(a, 8, 16, torch.zeros(6, dtype=torch.bool))
    assert int(num_blocks) == 0 and (pairs == 12).all() and (block_expert == -1).all()


def fused_case(t, k, e, h, i, valid=None, block_m=16, seed=0):
    ids, w = routing(t, k, e, seed=seed)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(seed + 7))
    wgu, wd = dense_weights(e, h, i, seed=seed + 1)
    got = fused_moe(x, ids, w, wgu, wd, valid=valid, block_m=block_m, **TILES)
    return got, reference(x, ids, w, wgu, wd, valid)


@pytest.mark.parametrize(
    "t,k,e,h,i",
    [(1, 2, 4, 64, 32),     # one token
     (5, 2, 16, 72, 40),    # most experts empty; ragged H and I
     (24, 2, 2, 64, 32)],   # 24 pairs per expert: more rows than a block of 16
)
def test_fused_moe_matches_reference(t, k, e, h, i):
    got, want = fused_case(t, k, e, h, i)
    assert got.shape == (t, h) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_one_expert_many_rows():
    """40 pairs on one expert, block_m 16: three blocks of it, the last partly padding."""
    t, e, h, i = 40, 3, 64, 48
    ids = torch.full((t, 1), 1)
    w = torch.ones(t, 1)
    x = torch.randn(t, h)
    wgu, wd = dense_weights(e, h, i)
    _, block_expert, num_blocks = moe_align(ids, e, 16)
    assert int(num_blocks) == 3 and block_expert[:3].tolist() == [1, 1, 1]
    got = fused_moe(x, ids, w, wgu, wd, block_m=16, **TILES)
    assert rel_err(got, reference(x, ids, w, wgu, wd)) < 1e-5


def test_padding_rows_zero_and_usage():
    t, k, e, h, i = 9, 2, 4, 64, 32
    ids, w = routing(t, k, e, seed=3)
    valid = torch.tensor([True, True, False, True, False, True, True, True, False])
    x = torch.randn(t, h)
    wgu, wd = dense_weights(e, h, i)
    usage = torch.zeros(2, e, dtype=torch.float64)
    got = fused_moe(x, ids, w, wgu, wd, valid=valid, usage=usage, **TILES)
    assert (got[~valid] == 0).all()
    assert rel_err(got[valid], reference(x, ids, w, wgu, wd, valid)[valid]) < 1e-5
    counts = torch.zeros(e, dtype=torch.float64)
    mass = torch.zeros(e, dtype=torch.float64)
    for tt in range(t):
        for j in range(k):
            if valid[tt]:
                counts[ids[tt, j]] += 1
                mass[ids[tt, j]] += w[tt, j].double()
    assert torch.equal(usage[0], counts)
    torch.testing.assert_close(usage[1], mass)
    fused_moe(x, ids, w, wgu, wd, valid=valid, usage=usage, **TILES)  # adds, not overwrites
    assert torch.equal(usage[0], 2 * counts)


def fp8_weight(e: int, out: int, inp: int, block: tuple[int, int], gen: torch.Generator) -> Fp8Tensor:
    q = (torch.randn(e, out, inp, generator=gen) * 3).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(e, *scale_shape((out, inp), block), generator=gen) * 0.02 + 0.01
    return Fp8Tensor(q, s)


@pytest.mark.parametrize(
    "h,i,block,tiles",
    [(200, 72, (128, 128), dict(block_n=32, block_k=32)),   # ragged edges, one scale block per tile
     (96, 40, (16, 32), dict(block_n=32, block_k=64))],      # tiles spanning scale blocks along N
)
def test_fused_moe_fp8_matches_dequantized(h, i, block, tiles):
    t, k, e = 6, 2, 4
    gen = torch.Generator().manual_seed(5)
    gate, up, down = fp8_weight(e, i, h, block, gen), fp8_weight(e, i, h, block, gen), fp8_weight(e, h, i, block, gen)
    ids, w = routing(t, k, e, seed=4)
    x = torch.randn(t, h, generator=gen)
    valid = torch.tensor([True, True, True, False, True, True])
    usage = torch.zeros(2, e, dtype=torch.float64)
    got = fused_moe_fp8(x, ids, w, gate, up, down, block, valid=valid, usage=usage, block_m=16, **tiles)

    def deq(wt: Fp8Tensor, ex: int) -> torch.Tensor:
        return dequantize_fp8(wt.q[ex], wt.scale_inv[ex], block, torch.float32)

    wgu = torch.stack([torch.cat([deq(gate, ex).t(), deq(up, ex).t()], 1) for ex in range(e)])
    wd = torch.stack([deq(down, ex).t() for ex in range(e)])
    want = reference(x, ids, w, wgu, wd, valid)
    assert rel_err(got, want) < 1e-4
    assert (got[~valid] == 0).all()
    assert usage[0].sum() == 5 * k


class NoSync(TorchDispatchMode):
    """Raises on the ops that read device values to the host or give data-dependent shapes."""

    BANNED = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "repeat_interleave"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.BANNED or name.lstrip("_").startswith("unique"):
            raise AssertionError(f"host sync / dynamic shape: aten.{name}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync():
    """The whole wrapper, kernels included, under the mode (the interpreter copies arguments
    through their storages, which issues no banned op)."""
    t, k, e, h, i = 4, 2, 4, 64, 32
    ids, w = routing(t, k, e)
    x = torch.randn(t, h)
    wgu, wd = dense_weights(e, h, i)
    valid = torch.tensor([True, False, True, True])
    usage = torch.zeros(2, e, dtype=torch.float64)
    with pytest.raises(AssertionError):  # the mode does catch a sync
        with NoSync():
            torch.ones(1).item()
    with NoSync():
        moe_align(ids, e, 16, valid)
        got = fused_moe(x, ids, w, wgu, wd, valid=valid, usage=usage, **TILES)
    assert rel_err(got, reference(x, ids, w, wgu, wd, valid)) < 1e-5
