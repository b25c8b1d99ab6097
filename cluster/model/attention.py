"""Attention over the paged KV cache.

A batch is laid out decode tokens first (one query each), then the prefill chunks. Decodes are
attended in one batched call over their gathered block tables; each prefill chunk attends to its
cached prefix plus itself under a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cluster import native
from cluster.kernels import gpu as triton_kernels
from cluster.model.layers import apply_rope, rms_norm


@dataclass
class PrefillChunk:
    start: int                 # first row of the chunk in the flat batch
    length: int                # query tokens in this chunk
    context_len: int           # tokens attended to (cached prefix + this chunk)
    block_table: torch.Tensor  # [blocks covering context_len]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                 # [T] cache slot of each new token
    cos: torch.Tensor                          # [T, 1, head_dim]
    sin: torch.Tensor
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks]
    decode_lens: torch.Tensor | None = None          # [D] context length of each decode
    decode_mask: torch.Tensor | None = None          # [D, 1, 1, max_blocks * block_size], 0 or -inf
    prefills: list[PrefillChunk] = field(default_factory=list)
    # [T] 1 for real rows, 0 for a static step's padding rows (which count no expert usage); None: all real
    row_mask: torch.Tensor | None = None

    @property
    def pure_decode(self) -> bool:
        return not self.prefills


def qk_norm_rope_cache(qkv: torch.Tensor, qk_norm: torch.Tensor, eps: float, cos: torch.Tensor,
                       sin: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                       num_heads: int) -> torch.Tensor:
    """qkv [T, H + 2*KV, d] from the fused projection: normalises the q and k heads (qk_norm
    [H + KV, d]), rotates them (cos/sin [T, 1, d] from `rope_tables`), writes the keys and values
    into their cache slots and returns the queries [T, H, d]. The PyTorch twin of the fused kernel
    (cluster/kernels/gpu/norm_rope.py), which does it in one pass."""
    q, kv = norm_rope(qkv, qk_norm, eps, cos, sin, num_heads)
    kv_cache.view(-1, kv.shape[1], kv.shape[2]).index_copy_(0, slot_mapping.long(), kv)
    return q


def norm_rope(qkv: torch.Tensor, qk_norm: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
              num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries [T, H, d] and the new keys and values [T, 2*KV, d] of a fused projection:
    q and k heads normalised together and rotated, the values as they came."""
    h = num_heads
    kvh = (qkv.shape[1] - h) // 2
    qk = apply_rope(rms_norm(qkv[:, : h + kvh], qk_norm, eps), cos, sin)
    return qk[:, :h], torch.cat([qk[:, h:], qkv[:, h + kvh:]], dim=1)


def paged_attention(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q [T, H, d]; kv [T, 2*KV, d] (keys then values of the new tokens); kv_cache
    [blocks, block_size, 2*KV, d]. Writes kv into the cache, returns the output [T, H, d].
    Keys and values share one cache tensor so that each layer does one write and one gather."""
    t, heads, dim = q.shape
    kv_heads = kv.shape[1] // 2
    group = heads // kv_heads
    kv_cache.view(-1, 2 * kv_heads, dim).index_copy_(0, meta.slot_mapping, kv)
    d = meta.num_decodes
    if d and d == t:  # a pure decode step: no output buffer to fill
        return decode_attention(q, kv_cache, meta)
    out = torch.empty_like(q)
    if d:
        out[:d] = decode_attention(q[:d], kv_cache, meta)
    for c in meta.prefills:
        rows = slice(c.start, c.start + c.length)
        if c.context_len == c.length:  # no cached prefix: attend to the chunk's own k/v
            ctx, mask, causal = kv[rows], None, True
        else:
            ctx = kv_cache.index_select(0, c.block_table).view(-1, 2 * kv_heads, dim)[: c.context_len]
            pos_q = torch.arange(c.context_len - c.length, c.context_len, device=q.device).unsqueeze(1)
            mask, causal = torch.arange(c.context_len, device=q.device).unsqueeze(0) <= pos_q, False
        ctx = ctx.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), ctx[:, :kv_heads], ctx[:, kv_heads:],
            attn_mask=mask, is_causal=causal, enable_gqa=group > 1,
        )
        out[rows] = o[0].transpose(0, 1)
    return out


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """One query per sequence, batched over the block tables; q [D, H, d]. The Triton kernel
    (GPU) and the native one (CPU) read the blocks in place; the PyTorch path gathers them first."""
    d, heads, dim = q.shape
    if (gpu := triton_kernels.for_tensor(q)) is not None:
        return gpu.paged_decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_lens, dim**-0.5)
    if (kernels := native.for_tensor(q)) is not None:
        return kernels.paged_decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_lens, dim**-0.5)
    if meta.decode_mask is None:  # the static step's tables: the mask comes from the lengths on the device
        return decode_attention_torch(q, kv_cache, meta.decode_block_tables, meta.decode_lens, dim**-0.5)
    return _gathered_attention(q, kv_cache, meta.decode_block_tables, meta.decode_mask, dim**-0.5)


def decode_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The PyTorch twin of the paged decode attention kernels: q [D, H, d]; block_tables [D, W]
    (entries past a sequence's blocks are ignored), context_lens [D] >= 1; returns [D, H, d]."""
    width = block_tables.shape[1] * kv_cache.shape[1]
    mask = (torch.arange(width, device=q.device) < context_lens[:, None].long())[:, None, None, :]
    return _gathered_attention(q, kv_cache, block_tables, mask, scale)


def _gathered_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Gathers every table entry's block, then one SDPA under `mask` (additive or boolean)."""
    d, heads, dim = q.shape
    kv_heads = kv_cache.shape[2] // 2
    # index_select copies whole blocks; advanced indexing is several times slower on CPU.
    ctx = kv_cache.index_select(0, block_tables.flatten().long()).view(d, -1, 2 * kv_heads, dim)
    keys, values = ctx[:, :, :kv_heads].transpose(1, 2), ctx[:, :, kv_heads:].transpose(1, 2)
    # The query heads that share a KV head act as that many queries of that head.
    o = F.scaled_dot_product_attention(q.view(d, kv_heads, heads // kv_heads, dim), keys, values,
                                       attn_mask=mask, scale=scale)
    return o.reshape(d, heads, dim)
