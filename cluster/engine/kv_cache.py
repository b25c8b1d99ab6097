"""Paged KV-cache block manager with prefix caching.

Blocks are fixed-size slices of the per-layer KV tensors. A full block whose K/V are computed
is registered under a hash chained over all tokens up to it, so a later sequence with the same
prefix maps those blocks instead of recomputing them. Freed blocks keep their hash while they
sit in the free list (LRU order) and are reclaimed from it on a hit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cluster.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Maps the longest cached prefix of an unallocated sequence; returns tokens covered.
        The last token is never taken from the cache, since its logits must be computed."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        prev: int | None = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            toks = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((prev, toks))
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != toks:
                break
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows the sequence's block table to hold `num_tokens` tokens."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise NoFreeBlocks(f"need {need} KV blocks, {self.num_free} free")
        for _ in range(need):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(bid)

    def commit(self, seq: Sequence) -> None:
        """Registers the hashes of blocks that became full and computed in the last step."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), full):
            toks = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((seq.block_hashes[-1] if seq.block_hashes else None, toks))
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, toks
            self.cached.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def release(self, seq: Sequence) -> None:
        """Drops the sequence's references; the tail blocks are evicted first."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
