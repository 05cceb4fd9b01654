"""A fixed pool of KV blocks with reference counts, a free queue and a prefix-cache index.

Invariants:
- a block with ref_cnt == 0 is in the free queue, and only such blocks are;
- a free block may still hold cached KV (block_hash set): it is reused by a prefix-cache hit
  (`touch`) or evicted when `allocate` takes it from the front of the queue (least recently freed
  first);
- `cached` maps each block hash to exactly one block, whose `block_hash` equals that key.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable

from triphase.common.block_hash import hash_block_tokens

__all__ = ["Block", "BlockPool", "NoFreeBlocks", "hash_block_tokens"]


@dataclasses.dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt})"


class NoFreeBlocks(Exception):
    """Fewer free blocks than asked for; callers check `num_free` first."""


class BlockPool:
    def __init__(self, num_blocks: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}
        self.cached_version = 0  # bumped whenever `cached` gains or loses a hash
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_ids(self) -> list[int]:
        """Free block ids in queue order (next to be reused first)."""
        return list(self._free)

    def allocate(self, count: int) -> list[Block]:
        """Take `count` blocks from the front of the free queue, evicting their cached KV."""
        if count > len(self._free):
            raise NoFreeBlocks(f"asked for {count} blocks, {len(self._free)} free")
        taken = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
                self.cached_version += 1
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def take_null(self) -> Block:
        """Take one free block out of circulation for good: the placeholder a request's table holds
        where a block was dropped (sliding windows). It is never written, cached or freed."""
        _, block = self._free.popitem(last=False)
        block.ref_cnt = 1
        return block

    def lookup(self, block_hash: int) -> Block | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take another reference to (possibly free) cached blocks."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the free queue in the given
        order (so pass a request's blocks tail-first: its last blocks are evicted first)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache(self, block: Block, block_hash: int) -> None:
        """Index a full block under its hash (first writer wins: duplicates stay uncached)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block
        self.cached_version += 1

    def _uncache(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            block.block_hash = None
            self.cached_version += 1

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of free blocks; returns how many were dropped."""
        dropped = 0
        for block in self._free.values():
            if block.block_hash is not None:
                self._uncache(block)
                dropped += 1
        return dropped
