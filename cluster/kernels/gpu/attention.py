"""Paged decode attention: one query token per sequence against its KV cache, read in place
through the block table (no gather copy). PyTorch twin: `cluster.model.attention.decode_attention_torch`.

Split-KV ("flash decoding"): a decode step has only B * KVH (sequence, KV head) pairs, four for one
sequence of Qwen3-30B-A3B, far fewer than a GPU's SMs; so each sequence's blocks are also cut into
`num_splits` contiguous ranges, each its own program with its own online softmax, and a second
kernel merges the splits with their log-sum-exps. A program takes all G query heads of its KV head
(GQA), so each K/V block is read once per split rather than once per query head.

The split count is fixed on the host from static shapes only, and each program finds its range from
the sequence's length on the device: no host sync, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_MAX_SPLITS = 32     # beyond this the merge's reads outgrow what more parallelism buys
_PRODUCT_BUDGET = 16384  # elements of the [G, BLOCK_N, D] q·k / p·v products held per program


@triton.jit
def _split_kernel(
    q_ptr, kv_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr, scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Stage 1, grid (B, KVH, S): the G query heads of one KV head over split S of the sequence's
    blocks. Scores are kept in log2 units (scale folds in log2 e) so the softmax runs on exp2."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_SIZE), NUM_SPLITS)  # blocks per split, this sequence
    start = s * per_split * BLOCK_SIZE
    end = tl.minimum(start + per_split * BLOCK_SIZE, seq_len)  # start >= end: an empty split

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + g
    hd_mask = (g < G)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=hd_mask, other=0.0)
    q = q.to(tl.float32) * (scale * 1.4426950408889634)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    k_base = kv_ptr + kvh * stride_kh
    v_base = kv_ptr + (KVH + kvh) * stride_kh
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        t_mask = tok < end
        blk = tl.load(bt_ptr + b * stride_btb + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        rows = (blk * stride_kb + (tok % BLOCK_SIZE) * stride_kt)[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & (d < D)[None, :]
        k = tl.load(k_base + rows, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G_PAD, BLOCK_N]
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every chunk has a valid token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        v = tl.load(v_base + rows, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new

    safe_l = tl.where(l > 0, l, 1.0)
    o = acc / safe_l[:, None]  # an empty split writes zeros
    out = out_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + d[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    if WRITE_LSE:
        lse = tl.where(l > 0, m + tl.log2(safe_l), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=g < G)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    """Stage 2, grid (B, H): the splits' outputs weighted by exp2(lse - max lse). Split 0 is never
    empty (context_len >= 1), so the max is finite and empty splits (lse = -inf) weigh zero."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < NUM_SPLITS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    mask = (s < NUM_SPLITS)[:, None] & (d < D)[None, :]
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :], mask=mask, other=0.0)
    o = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; an H100's count elsewhere (the interpreter), so tests split alike."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def choose_num_splits(batch: int, kv_heads: int, width: int, device: torch.device) -> int:
    """Enough splits for about two programs per SM, from static shapes only (never the lengths):
    no more than the table's width W (a split of a full-length sequence holds at least one block)
    nor _MAX_SPLITS. A large batch fills the GPU alone and gets one split, and no merge."""
    want = triton.cdiv(2 * _sm_count(device), max(1, batch * kv_heads))
    return max(1, min(want, width, _MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """q [B, H, D]; kv_cache [num_blocks, block_size, 2*KVH, D] (keys in head slots 0..KVH-1, values
    after); block_tables [B, W] int32 (entries past a sequence's blocks ignored); context_lens [B]
    int32, each >= 1. Returns [B, H, D] in q.dtype. Host-sync free (capturable in a CUDA graph)."""
    batch, heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[1], kv_cache.shape[2] // 2
    group = heads // kv_heads
    width = block_tables.shape[1]
    if q.stride(2) != 1:
        q = q.contiguous()
    if kv_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("kv_cache and block_tables need a contiguous last dimension")
    splits = num_splits or choose_num_splits(batch, kv_heads, width, q.device)
    g_pad, d_pad = triton.next_power_of_2(group), triton.next_power_of_2(dim)
    block_n = max(16, min(64, _PRODUCT_BUDGET // (g_pad * d_pad)))
    block_n = 1 << (block_n.bit_length() - 1)  # a power of two
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    if splits == 1:  # stage 1 writes the final output; no merge
        part, lse = out, out
        part_strides, lse_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        part_strides, lse_strides = part.stride()[:3], lse.stride()[:2]
    _split_kernel[(batch, kv_heads, splits)](
        q, kv_cache, block_tables, context_lens, part, lse, scale,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_tables.stride(0), *part_strides, *lse_strides,
        KVH=kv_heads, G=group, D=dim, BLOCK_SIZE=block_size, NUM_SPLITS=splits, G_PAD=g_pad,
        D_PAD=d_pad, BLOCK_N=block_n, WRITE_LSE=splits > 1, num_warps=4,
    )
    if splits > 1:
        _merge_kernel[(batch, heads)](
            part, lse, out, *part.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1),
            NUM_SPLITS=splits, S_PAD=triton.next_power_of_2(splits), D=dim, D_PAD=d_pad, num_warps=4,
        )
    return out
