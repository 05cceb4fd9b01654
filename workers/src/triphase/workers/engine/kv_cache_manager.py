"""Which blocks each request owns, prefix-cache look-ups, and slot allocation.

A request's blocks hold its tokens in order: token i lives in block table[i // block_size], slot
i % block_size. Full blocks whose KV has been computed are indexed by their chained hash so a
later request with the same prefix shares them (reference counted) instead of recomputing.

Sliding windows (`sliding_window`, set when every layer of the model slides: Mistral 7B v0.1,
Phi-3-mini): a query at position p reads keys p - window + 1 .. p, so once a request's next token is
at p, its blocks that end before p - window + 1 are never read again. They are released (after being
indexed in the prefix cache, as any computed block) and their entries in the table point at one
reserved, never-written null block, so positions keep their meaning and the attention gather
reads a valid block it then masks. An imported prompt gets blocks for its live tail only (the
transports move `block_ids[-len(dst):]`). Models that mix sliding and global layers (Gemma 3)
keep every block: one block holds every layer's KV, and the global layers read them all.
"""

from __future__ import annotations

from collections.abc import Sequence

from triphase.common.block_hash import salted_root, span_digests
from triphase.workers.engine.block_pool import Block, BlockPool, NoFreeBlocks, hash_block_tokens
from triphase.workers.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 prefix_salt: bytes = b"", sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.root = salted_root(prefix_salt)  # the chains' first parent (block_hash.py)
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[int]] = {}  # hashes of the request's full blocks, in order
        self._num_cached: dict[str, int] = {}  # how many of its blocks are already indexed
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache
        self.sliding_window = sliding_window
        self.null_block = self.pool.take_null() if sliding_window is not None else None
        self._dropped: dict[str, int] = {}  # leading blocks of the request replaced by the null block
        self.blocks_dropped = 0  # blocks released early because no query reads them again

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def owns(self, request_id: str) -> bool:
        return request_id in self._blocks

    def _request_hashes(self, request: Request) -> list[int]:
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        full = request.num_tokens // bs
        while len(hashes) < full:
            start, end = len(hashes) * bs, (len(hashes) + 1) * bs
            hashes.append(hash_block_tokens(hashes[-1] if hashes else self.root, request.token_ids[start:end],
                                            span_digests(request.images, start, end)))
        return hashes

    # ------------------------------------------------------------------ allocation
    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of the request's tokens: (blocks, tokens). At least one token is left
        to compute, because the step that computes it also produces the next token's logits."""
        if not self.enable_prefix_caching or request.sampling.prompt_logprobs is not None:
            return [], 0
        hits: list[Block] = []
        for block_hash in self._request_hashes(request):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        if hits and len(hits) * self.block_size >= request.num_tokens:
            hits.pop()
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[Block] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones (and after
        `computed_blocks`, prefix hits being adopted now). False, changing nothing, if the pool
        cannot supply the blocks."""
        owned = self._blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = cdiv(num_computed + num_new_tokens, self.block_size) - len(owned) - len(computed_blocks)
        reusable_free = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if needed > self.pool.num_free - reusable_free:
            return False
        self.pool.touch(computed_blocks)
        new = self.pool.allocate(max(needed, 0))
        self._blocks[request.request_id] = [*owned, *computed_blocks, *new]
        if computed_blocks:
            self._num_cached[request.request_id] = len(owned) + len(computed_blocks)
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Index the request's full blocks whose KV is now computed."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self._blocks.get(rid)
        if not blocks:
            return
        full = min(request.num_computed_tokens // self.block_size, len(blocks))
        done = self._num_cached.get(rid, 0)
        if full <= done:
            return
        hashes = self._request_hashes(request)
        for i in range(done, full):
            if blocks[i] is not self.null_block:
                self.pool.cache(blocks[i], hashes[i])
        self._num_cached[rid] = full

    def dead_blocks(self, next_position: int) -> int:
        """How many leading blocks no query at `next_position` or later reads (0 without a window)."""
        if self.sliding_window is None:
            return 0
        return max(0, next_position - self.sliding_window + 1) // self.block_size

    def drop_out_of_window(self, request: Request) -> int:
        """Release the request's blocks that fell out of the sliding window; returns how many."""
        if self.sliding_window is None:  # every step calls this for every request
            return 0
        blocks = self._blocks.get(request.request_id)
        dead = self.dead_blocks(request.num_computed_tokens)
        done = self._dropped.get(request.request_id, 0)
        if not blocks or dead <= done:
            return 0
        dead = min(dead, len(blocks) - 1)  # the block the next token goes to stays
        gone = blocks[done:dead]
        assert self.null_block is not None
        blocks[done:dead] = [self.null_block] * len(gone)
        self._dropped[request.request_id] = dead
        self.pool.release(reversed(gone))
        self.blocks_dropped += len(gone)
        return len(gone)

    def free(self, request_id: str) -> None:
        """Release a request's blocks (tail first, so its last blocks are evicted first)."""
        blocks = self._blocks.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        self._dropped.pop(request_id, None)
        if blocks:
            self.pool.release(b for b in reversed(blocks) if b is not self.null_block)

    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Give `child` (the same prompt as `parent`, whose prompt KV is computed) the parent's prompt KV
        but for its last token: the blocks before the one holding the prompt's last token are shared
        (one more reference each; nobody writes to them again), and that block, where the choices'
        tokens diverge, gets a fresh block of the child's own. The child then computes the prompt's
        last token itself (its logits draw its first token), so `child.num_computed_tokens` is set to
        the prompt's length - 1. Returns (source, destination) when the fresh block must first receive
        a copy of the tokens before the last one; raises NoFreeBlocks when there is no free block."""
        last = parent.num_prompt_tokens - 1
        own = self._blocks[parent.request_id]
        j = last // self.block_size
        if self.pool.num_free < 1:
            raise NoFreeBlocks("no free block to fork into")
        self.pool.touch(b for b in own[:j] if b is not self.null_block)
        [fresh] = self.pool.allocate(1)
        self._blocks[child.request_id] = [*own[:j], fresh]
        if parent.request_id in self._dropped:
            self._dropped[child.request_id] = min(self._dropped[parent.request_id], j)
        child.num_computed_tokens = last
        return (own[j].block_id, fresh.block_id) if last % self.block_size else None

    def adopt_imported(self, request: Request, num_tokens: int) -> list[int] | None:
        """Allocate fresh blocks for `num_tokens` of KV arriving from another engine; returns the ids
        of the blocks to fill: all of them, or with a sliding window the live tail only (the dead
        head points at the null block and is never moved). None when the pool cannot supply them."""
        total = cdiv(num_tokens, self.block_size)
        dead = min(self.dead_blocks(num_tokens), total - 1)
        if self.pool.num_free < total - dead:
            return None
        new = self.pool.allocate(total - dead)
        head: list[Block] = []
        if dead:
            assert self.null_block is not None
            head = [self.null_block] * dead
            self._dropped[request.request_id] = dead
        self._blocks[request.request_id] = [*head, *new]
        return [b.block_id for b in new]
