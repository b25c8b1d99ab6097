"""Fused normalisation kernels around attention, each one read of its inputs where PyTorch makes
several passes:

- `add_rms_norm`: the residual stream's add + RMSNorm (twin `cluster.model.layers.add_rms_norm`);
- `qk_norm_rope_cache`: Qwen3's per-head q/k RMSNorm, RoPE, and the K/V cache write (twin
  `cluster.model.attention.qk_norm_rope_cache`).

Statistics are in float32; every intermediate the twin rounds to the tensor's dtype is rounded the
same way here, so half types match the twin to the bit (but for the order of the sum of squares).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to `dtype` and back: what the twin's op in that dtype would have stored."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, eps,
    stride_x, stride_r, stride_o, stride_res,
    N: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row: a hidden row fits one program, so the sum of squares and the scaling
    share the single read of x and the residual."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    h = _round(x + r, res_ptr.dtype.element_ty)
    tl.store(res_ptr + row * stride_res + cols, h.to(res_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * _round(h * rstd, res_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, N] with a unit-stride last dim (a copy only when it has none)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, N] (one dtype), weight [N]: (RMSNorm(residual + x) * weight, residual + x).
    The sum is rounded to the dtype before it is normalised, as PyTorch's add would; the normed
    output takes the promoted dtype of weight and x, as the twin's product does."""
    shape, n = x.shape, x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    rows = x2.shape[0]
    new_res = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    out = torch.empty(rows, n, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), out, new_res, eps,
            x2.stride(0), r2.stride(0), out.stride(0), new_res.stride(0),
            N=n, BLOCK=block, num_warps=4 if block <= 2048 else 8,
        )
    return out.view(shape), new_res.view(shape)


@triton.jit
def _qk_norm_rope_cache_kernel(
    qkv_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, q_ptr, eps,
    stride_xt, stride_xh, stride_wh, stride_wd, stride_cos, stride_sin,
    stride_cb, stride_co, stride_ch, stride_qt, stride_qh,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid (T, head groups): HEADS heads of one token. q and k heads are normalised and rotated,
    v heads pass through; k and v go to the token's cache slot, q to the output. The rotation's
    other half (x.roll(D/2)) is a second read of the same row, normalised alike."""
    t = tl.program_id(0).to(tl.int64)
    hd = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # head index in qkv
    d = tl.arange(0, D_PAD)
    d_rot = (d + D // 2) % D
    dt = q_ptr.dtype.element_ty
    mask = (hd < H + 2 * KVH)[:, None] & (d < D)[None, :]
    normed = (hd < H + KVH)[:, None]
    row = qkv_ptr + t * stride_xt + hd[:, None] * stride_xh
    x = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_rot = tl.load(row + d_rot[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w_row = w_ptr + hd[:, None] * stride_wh
    w = tl.load(w_row + d[None, :] * stride_wd, mask=mask & normed, other=0.0).to(tl.float32)
    w_rot = tl.load(w_row + d_rot[None, :] * stride_wd, mask=mask & normed, other=0.0).to(tl.float32)
    y = _round(w * _round(x * rstd[:, None], dt), dt)
    y_rot = _round(w_rot * _round(x_rot * rstd[:, None], dt), dt)
    cos = tl.load(cos_ptr + t * stride_cos + d, mask=d < D, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + d, mask=d < D, other=0.0).to(tl.float32)
    roped = _round(y * cos[None, :], dt) + _round(y_rot * sin[None, :], dt)
    out = tl.where(normed, roped, x).to(dt)
    tl.store(q_ptr + t * stride_qt + hd[:, None] * stride_qh + d[None, :], out, mask=mask & (hd < H)[:, None])
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cache = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co
    slots = tl.zeros([HEADS], tl.int64) + slot  # as a vector: the interpreter masks with no scalar
    to_cache = mask & ((hd >= H) & (slots >= 0))[:, None]
    tl.store(cache + (hd - H)[:, None] * stride_ch + d[None, :], out.to(cache_ptr.dtype.element_ty), mask=to_cache)


def qk_norm_rope_cache(qkv: torch.Tensor, qk_norm: torch.Tensor, eps: float, cos: torch.Tensor,
                       sin: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                       num_heads: int) -> torch.Tensor:
    """qkv [T, H + 2*KVH, D]; qk_norm [H + KVH, D] in qkv's dtype (q heads' weights, then k's);
    cos/sin [T, 1, D] from `rope_tables` in qkv's dtype; slot_mapping [T] int32/int64 (a negative
    slot writes nothing: a padding token); kv_cache [blocks, block_size, 2*KVH, D]. Writes the
    normed, rotated keys and the raw values to the cache and returns the queries [T, H, D]."""
    tokens, all_heads, dim = qkv.shape
    kv_heads = (all_heads - num_heads) // 2
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    if kv_cache.stride(3) != 1:
        raise ValueError("kv_cache needs a contiguous last dimension")
    q = torch.empty(tokens, num_heads, dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    d_pad = triton.next_power_of_2(dim)
    heads = min(triton.next_power_of_2(all_heads), max(1, 1024 // d_pad))
    _qk_norm_rope_cache_kernel[(tokens, triton.cdiv(all_heads, heads))](
        qkv, qk_norm, cos, sin, slot_mapping, kv_cache, q, eps,
        qkv.stride(0), qkv.stride(1), qk_norm.stride(0), qk_norm.stride(1), cos.stride(0), sin.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), q.stride(0), q.stride(1),
        H=num_heads, KVH=kv_heads, D=dim, BLOCK_SIZE=kv_cache.shape[1], HEADS=heads, D_PAD=d_pad,
        num_warps=4,
    )
    return q
