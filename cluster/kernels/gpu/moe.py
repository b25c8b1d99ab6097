"""Grouped MoE experts in Triton (bf16 and block-scaled FP8): the twins of `LocalExperts` and
`Fp8Experts` in cluster/model, in the shape of vLLM's and SGLang's fused_moe.

The (token, slot) pairs are sorted by expert into segments padded to whole blocks of `block_m`
rows (`moe_align`), so that every block of rows belongs to one expert; then two GEMM kernels run
over those blocks: gate/up with the SwiGLU epilogue into an intermediate [P, I], and down, scaled
by each pair's routing weight, into one row per pair. Each token's k rows are summed in a fixed
order after (no atomics: the same batch gives the same bits every run).

Nothing here reads a value back to the host and every shape depends only on (T, k, E, block_m),
so the whole layer can be captured in a CUDA graph: the number of used blocks stays on the device
and the grid covers the static capacity, its unused programs returning at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # output columns per program (GPU default; tune per shape)
BLOCK_K = 64  # reduction step; for FP8 it must divide the scale block (128)
NUM_WARPS = 4
NUM_STAGES = 3


def capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted pairs may need: every expert's segment padded by at most block_m - 1,
    rounded up to whole blocks (static: what a CUDA graph needs)."""
    p = num_pairs + num_experts * (block_m - 1)
    return -(-p // block_m) * block_m


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: 16 while experts see few rows each (decode: little padding), larger for
    prefill, where bigger tiles use the tensor cores better (a starting point; tune on the GPU)."""
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 32 else 32 if per_expert <= 128 else 64


def moe_align(
    ids: torch.Tensor, num_experts: int, block_m: int, valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts the T*k (token, slot) pairs of `ids` [T, k] by expert into segments padded to
    multiples of `block_m`, on the device with no host sync and static shapes.

    Returns sorted_pairs [P] int32 (flat pair index t*k+j, or T*k for padding; P = `capacity`),
    block_expert [P // block_m] int32 (each block's expert, -1 past the used blocks) and
    num_blocks [1] int32 (the used blocks, left on the device). Pairs of tokens with `valid`
    False ([T] bool; padding tokens), and ids outside [0, E), are not placed at all."""
    t, k = ids.shape
    n, e, dev = t * k, num_experts, ids.device
    cap = capacity(n, e, block_m)
    flat = ids.reshape(-1).long()
    placed = (flat >= 0) & (flat < e)
    if valid is not None:
        placed &= valid[:, None].expand(t, k).reshape(-1)
    key = torch.where(placed, flat, e)  # bucket e: not placed, sorts last
    counts = torch.zeros(e + 1, dtype=torch.long, device=dev).index_add_(0, key, torch.ones_like(key))
    padded = (counts[:e] + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    start = counts.cumsum(0) - counts
    sorted_key, order = torch.sort(key, stable=True)
    rank = torch.arange(n, device=dev) - start[sorted_key]
    dest = torch.where(sorted_key < e, pad_start[sorted_key.clamp(max=e - 1)] + rank, cap)
    # one spare slot at `cap` takes the unplaced pairs, then is cut off
    sorted_pairs = torch.full((cap + 1,), n, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    total = pad_end[-1:] if e else torch.zeros(1, dtype=torch.long, device=dev)
    block_start = torch.arange(0, cap, block_m, device=dev)
    expert = torch.searchsorted(pad_end, block_start, right=True)  # first segment ending past it
    block_expert = torch.where(block_start < total, expert, -1).to(torch.int32)
    return sorted_pairs[:cap], block_expert, (total // block_m).to(torch.int32)


def count_usage(usage: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None) -> None:
    """Adds each expert's number of valid pairs to usage[0] and their summed routing weight to
    usage[1] ([2, E] float64), with index_add_ (no host sync; padding tokens add zeros)."""
    t, k = ids.shape
    flat = ids.reshape(-1).long()
    ok = (flat >= 0) & (flat < usage.shape[1])
    if valid is not None:
        ok &= valid[:, None].expand(t, k).reshape(-1)
    where = torch.where(ok, flat, 0)
    okf = ok.to(torch.float64)
    usage[0].index_add_(0, where, okf)
    usage[1].index_add_(0, where, weights.reshape(-1).to(torch.float64) * okf)


@triton.jit
def _weight_tile(w_ptrs, s_ptr, offs_k, offs_n, k0, K, N, s_sn, s_sk,
                 FP8: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr):
    """One [BLOCK_K, BLOCK_N] weight tile at K offset k0, as stored or, for FP8, dequantized to
    float32 here: the tile lies in one scale block along K (BLOCK_K divides SCALE_K), so the scale
    varies only per column (a tile may span scale blocks along N)."""
    kk = k0 + offs_k
    mask = (kk[:, None] < K) & (offs_n[None, :] < N)
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    if FP8:
        s = tl.load(s_ptr + (offs_n // SCALE_N) * s_sn + (k0 // SCALE_K) * s_sk, mask=offs_n < N, other=0.0)
        w = w.to(tl.float32) * s[None, :]
    return w


@triton.jit
def _gate_up_kernel(
    x_ptr, pairs_ptr, block_expert_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, inter_ptr,
    num_pairs, K, N, topk,
    s_xt, s_xk, s_we, s_wk, s_wn, s_se, s_sn, s_sk, s_it, s_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP8: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, IEEE: tl.constexpr,
):
    """inter[rows of block m, cols of tile n] = silu(x @ Wg) * (x @ Wu) for the block's expert;
    x's rows gathered by pair // topk, padding rows zero. W is addressed as [e, k, n] by strides."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    COMPUTE = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + offs_m).to(tl.int64)
    row_ok = pairs < num_pairs
    tok = pairs // topk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * s_xt + offs_k[None, :] * s_xk
    w_off = e * s_we + offs_k[:, None] * s_wk + offs_n[None, :] * s_wn
    g_ptrs = wg_ptr + w_off
    u_ptrs = wu_ptr + w_off
    sg = sg_ptr + e * s_se
    su = su_ptr + e * s_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=row_ok[:, None] & (k0 + offs_k[None, :] < K), other=0.0).to(COMPUTE)
        g = _weight_tile(g_ptrs, sg, offs_k, offs_n, k0, K, N, s_sn, s_sk, FP8, SCALE_N, SCALE_K).to(COMPUTE)
        u = _weight_tile(u_ptrs, su, offs_k, offs_n, k0, K, N, s_sn, s_sk, FP8, SCALE_N, SCALE_K).to(COMPUTE)
        if IEEE:
            acc_g += tl.dot(a, g, input_precision="ieee")
            acc_u += tl.dot(a, u, input_precision="ieee")
        else:
            acc_g += tl.dot(a, g)
            acc_u += tl.dot(a, u)
        x_ptrs += BLOCK_K * s_xk
        g_ptrs += BLOCK_K * s_wk
        u_ptrs += BLOCK_K * s_wk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_ptrs = inter_ptr + offs_m[:, None] * s_it + offs_n[None, :] * s_in
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=offs_n[None, :] < N)


@triton.jit
def _down_kernel(
    inter_ptr, pairs_ptr, block_expert_ptr, w_ptr, s_ptr, route_ptr, out_ptr,
    num_pairs, K, N,
    s_it, s_ik, s_we, s_wk, s_wn, s_se, s_sn, s_sk, s_ot, s_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP8: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, IEEE: tl.constexpr,
):
    """out[pair] = routing weight * (inter[block rows] @ Wd) for the block's expert; one row per
    (token, slot) pair, padding rows not stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    COMPUTE = inter_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + offs_m).to(tl.int64)
    row_ok = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + offs_m[:, None] * s_it + offs_k[None, :] * s_ik
    w_ptrs = w_ptr + e * s_we + offs_k[:, None] * s_wk + offs_n[None, :] * s_wn
    s_base = s_ptr + e * s_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=k0 + offs_k[None, :] < K, other=0.0).to(COMPUTE)
        w = _weight_tile(w_ptrs, s_base, offs_k, offs_n, k0, K, N, s_sn, s_sk, FP8, SCALE_N, SCALE_K).to(COMPUTE)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        a_ptrs += BLOCK_K * s_ik
        w_ptrs += BLOCK_K * s_wk
    route = tl.load(route_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * route[:, None]
    out_ptrs = out_ptr + pairs[:, None] * s_ot + offs_n[None, :] * s_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def _grouped(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None,
    usage: torch.Tensor | None, num_experts: int, inter_size: int, block_m: int | None,
    gate: tuple, up: tuple, down: tuple, fp8_block: Sequence[int] | None, block_n: int, block_k: int,
) -> torch.Tensor:
    """The shared pipeline. gate/up/down are (weight, (s_e, s_k, s_n), scale or None, scale
    strides (s_e, s_n, s_k)): each weight addressed as [e, k, n], whatever its memory layout."""
    t, h = x.shape
    k = ids.shape[1]
    n = t * k
    bm = block_m or default_block_m(n, num_experts)
    for size in (bm, block_n, block_k):  # tl.arange wants powers of two, tl.dot at least 16
        assert size >= 16 and size & (size - 1) == 0, f"block size {size} is not a power of two >= 16"
    sorted_pairs, block_expert, _ = moe_align(ids, num_experts, bm, valid)
    if usage is not None:
        count_usage(usage, ids, weights, valid)
    num_blocks = block_expert.shape[0]
    route = weights.contiguous()
    inter = torch.empty(sorted_pairs.shape[0], inter_size, dtype=x.dtype, device=x.device)
    # pairs that no block holds (padding tokens, ids outside [0, E)) keep zero rows
    out_pairs = torch.zeros(n, h, dtype=x.dtype, device=x.device)
    fp8 = fp8_block is not None
    scale_n, scale_k = fp8_block if fp8 else (1, 1)
    ieee = x.dtype == torch.float32  # float32 means exact float32 (no TF32) on the GPU
    opts = dict(BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, FP8=fp8, SCALE_N=scale_n, SCALE_K=scale_k,
                IEEE=ieee, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    (wg, gst, sg, sgst), (wu, ust, su, sust), (wd, dst, sd, sdst) = gate, up, down
    assert gst == ust and sgst == sust, "gate and up must share their layout"
    _gate_up_kernel[(num_blocks, triton.cdiv(inter_size, block_n))](
        x, sorted_pairs, block_expert, wg, wu, sg if fp8 else wg, su if fp8 else wu, inter,
        n, h, inter_size, k, x.stride(0), x.stride(1), *gst, *sgst, inter.stride(0), inter.stride(1), **opts,
    )
    _down_kernel[(num_blocks, triton.cdiv(h, block_n))](
        inter, sorted_pairs, block_expert, wd, sd if fp8 else wd, route, out_pairs,
        n, inter_size, h, inter.stride(0), inter.stride(1), *dst, *sdst, out_pairs.stride(0), out_pairs.stride(1),
        **opts,
    )
    return out_pairs.view(t, k, h).sum(1)


def fused_moe(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
    valid: torch.Tensor | None = None, usage: torch.Tensor | None = None, block_m: int | None = None,
    *, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
) -> torch.Tensor:
    """`LocalExperts`' output for x [T, H], ids [T, k] (any integer dtype), weights [T, k] (the
    renormalised routing weights), input-major w_gate_up [E, H, 2I] (gate then up) and w_down
    [E, I, H]: [T, H] in x's dtype. Tokens with `valid` False ([T] bool) give zero rows; `usage`
    ([2, E] float64) gets each expert's valid pair count and routing-weight sum added.

    No host sync (a CUDA graph can capture it), except under TRITON_INTERPRET=1, where the
    interpreter itself copies the arguments to host memory."""
    e, _, i2 = w_gate_up.shape
    i = i2 // 2
    strides = (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2))
    none = (0, 0, 0)
    return _grouped(
        x, ids, weights, valid, usage, e, i, block_m,
        (w_gate_up, strides, None, none), (w_gate_up[:, :, i:], strides, None, none),
        (w_down, (w_down.stride(0), w_down.stride(1), w_down.stride(2)), None, none),
        None, block_n, block_k,
    )


def _fp8_operand(w) -> tuple:
    """An [E, out, in] e4m3 weight with scales [E, out blocks, in blocks], addressed as [e, k, n]."""
    q, s = w[0], w[1]
    return q, (q.stride(0), q.stride(2), q.stride(1)), s, (s.stride(0), s.stride(1), s.stride(2))


def fused_moe_fp8(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate, up, down, block: Sequence[int],
    valid: torch.Tensor | None = None, usage: torch.Tensor | None = None, block_m: int | None = None,
    *, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
) -> torch.Tensor:
    """`fused_moe` for `Fp8Experts`' weights: gate, up [E, I, H] and down [E, H, I] (the hub's
    [out, in] layout), each a (q e4m3, scale_inv float32 [E, ceil(out/bn), ceil(in/bk)]) pair with
    `block` = (bn, bk). Weight tiles are dequantized in registers (q * their block's scale) and
    multiplied in x's dtype with float32 accumulation. `block_k` must divide bk, so that a K step
    never straddles two scale blocks; ragged last blocks are masked."""
    bn, bk = block
    block_k = min(block_k, bk)
    assert bk % block_k == 0, f"block_k {block_k} must divide the FP8 scale block {bk}"
    g, u, d = _fp8_operand(gate), _fp8_operand(up), _fp8_operand(down)
    e, i = g[0].shape[0], g[0].shape[1]
    return _grouped(x, ids, weights, valid, usage, e, i, block_m, g, u, d, (bn, bk), block_n, block_k)
