"""Attention over the paged KV cache.

A batch is laid out decode tokens first (one query each), then the prefill chunks. Decodes are
attended in one batched call over their gathered block tables; each prefill chunk attends to its
cached prefix plus itself under a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    decode_mask: torch.Tensor | None = None          # [D, 1, 1, max_blocks * block_size]
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
) -> torch.Tensor:
    """q [T, H, d], k/v [T, KV, d]; caches [blocks, block_size, KV, d]. Writes k/v into the cache
    and returns the attention output [T, H, d]."""
    t, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    k_cache.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        # The `group` query heads that share a KV head act as `group` queries of that head.
        keys = k_cache[meta.decode_block_tables].view(d, -1, kv_heads, dim).transpose(1, 2)
        values = v_cache[meta.decode_block_tables].view(d, -1, kv_heads, dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:d].view(d, kv_heads, group, dim), keys, values, attn_mask=meta.decode_mask
        )
        out[:d] = o.reshape(d, heads, dim)
    for c in meta.prefills:
        rows = slice(c.start, c.start + c.length)
        qi = q[rows].transpose(0, 1).unsqueeze(0)
        if c.context_len == c.length:  # no cached prefix: attend to the chunk's own k/v
            ki, vi = k[rows], v[rows]
            mask, causal = None, True
        else:
            ki = k_cache[c.block_table].view(-1, kv_heads, dim)[: c.context_len]
            vi = v_cache[c.block_table].view(-1, kv_heads, dim)[: c.context_len]
            offset = c.context_len - c.length
            pos_q = torch.arange(offset, c.context_len).unsqueeze(1)
            mask, causal = torch.arange(c.context_len).unsqueeze(0) <= pos_q, False
        o = F.scaled_dot_product_attention(
            qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, enable_gqa=group > 1,
        )
        out[rows] = o[0].transpose(0, 1)
    return out
