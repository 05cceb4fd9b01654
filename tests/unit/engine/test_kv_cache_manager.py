"""KV manager: slot allocation per request, prefix-cache hits with exact block ids, freeing."""

import pytest

from triphase.workers.engine.block_pool import NoFreeBlocks
from triphase.workers.engine.kv_cache_manager import KVCacheManager
from triphase.workers.engine.request import Request
from triphase.workers.engine.sampling import SamplingParams


def req(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def compute(kv, request, n):
    assert kv.allocate_slots(request, n)
    request.num_computed_tokens += n
    kv.cache_computed_blocks(request)


def test_allocates_blocks_as_tokens_grow():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 10
    r.append_token(99)
    r.append_token(98)
    assert kv.allocate_slots(r, 1)  # token 11 still fits in block 2
    assert kv.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 12  # token 12 starts block 3
    assert kv.allocate_slots(r, 1)
    assert kv.block_ids("a") == [0, 1, 2, 3]


def test_refuses_without_side_effects_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.num_free_blocks == 2
    assert not kv.owns("a")


def test_prefix_hit_shares_full_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))
    compute(kv, a, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    b = req("b", [*range(8), 50, 51, 52])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert kv.allocate_slots(b, 3, hits)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]


def test_full_prompt_hit_leaves_last_block_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    compute(kv, req("a", list(range(8))), 8)
    hits, n = kv.get_computed_blocks(req("b", list(range(8))))
    assert [h.block_id for h in hits] == [0] and n == 4


def test_freed_blocks_stay_cached_until_evicted_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    compute(kv, req("a", [1, 2, 3, 4, 5, 6]), 6)
    kv.free("a")
    assert kv.pool.free_ids() == [3, 2, 1, 0]  # 3 was never used; then a's blocks tail first
    b = req("b", [1, 2, 3, 4, 9])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 4
    assert kv.allocate_slots(b, 1, hits)
    assert kv.block_ids("b") == [0, 1, 3]
    # Allocating for another request evicts a's last block (2) before anything else.
    c = req("c", [7, 7])
    assert kv.allocate_slots(c, 2)
    assert kv.block_ids("c") == [2]
    assert kv.pool.num_evictions == 1


def test_prefix_hit_counters():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    compute(kv, req("a", list(range(9))), 9)
    kv.get_computed_blocks(req("b", list(range(9))))
    assert kv.prefix_queries == 9 and kv.prefix_hits == 8


def test_free_returns_everything():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    r = req("a", list(range(20)))
    compute(kv, r, 20)
    kv.free("a")
    assert kv.num_free_blocks == 6
    assert kv.usage == 0.0


def test_fork_shares_the_blocks_before_the_last_prompt_token_and_copies_its_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = req("a", list(range(10)))  # tokens 0-9: blocks 0, 1 full; token 9 in block 2 (slot 1)
    compute(kv, parent, 10)
    child = req("a#1", list(range(10)))
    assert kv.fork(parent, child) == (2, 3)  # block 2 holds token 8 too: copied into the child's block 3
    assert kv.block_ids("a#1") == [0, 1, 3] and child.num_computed_tokens == 9
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    kv.free("a")  # the parent ends first: the child keeps the shared blocks
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [1, 1, 0, 1]
    kv.free("a#1")
    assert kv.num_free_blocks == 8


def test_fork_where_the_last_prompt_token_starts_a_block_copies_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = req("a", list(range(9)))  # token 8 alone in block 2
    compute(kv, parent, 9)
    child = req("a#1", list(range(9)))
    assert kv.fork(parent, child) is None
    assert kv.block_ids("a#1") == [0, 1, 3] and child.num_computed_tokens == 8


def test_fork_without_a_free_block_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    parent = req("a", list(range(6)))
    compute(kv, parent, 6)
    with pytest.raises(NoFreeBlocks):
        kv.fork(parent, req("a#1", list(range(6))))
    assert not kv.owns("a#1") and [b.ref_cnt for b in kv.pool.blocks] == [1, 1]


# ---------------------------------------------------------------- sliding windows (every layer slides)
def windowed(num_blocks=16, window=8):
    kv = KVCacheManager(num_blocks=num_blocks, block_size=4, sliding_window=window)
    assert kv.null_block is not None and kv.null_block.block_id == 0  # reserved, never handed out
    return kv


def test_blocks_out_of_the_window_are_released_and_point_at_the_null_block():
    kv = windowed()
    r = req("a", list(range(20)))
    compute(kv, r, 20)
    assert kv.block_ids("a") == [1, 2, 3, 4, 5]
    # The next query is at 20 and reads keys 13..20: blocks 0-2 (tokens 0..11) are dead, block 3 is not.
    assert kv.drop_out_of_window(r) == 3
    assert kv.block_ids("a") == [0, 0, 0, 4, 5]
    assert kv.num_free_blocks == 15 - 2 and kv.blocks_dropped == 3
    assert kv.drop_out_of_window(r) == 0  # nothing more until the window moves past block 3
    r.append_token(7)
    compute(kv, r, 1)  # token 20 -> block 5; next query at 21 reads 14..21
    assert kv.drop_out_of_window(r) == 0
    for token in range(3):
        r.append_token(token)
        compute(kv, r, 1)
    assert r.num_computed_tokens == 24 and kv.drop_out_of_window(r) == 1  # reads 17..24: block 3 is dead
    assert kv.block_ids("a") == [0, 0, 0, 0, 5, 6]
    kv.free("a")
    assert kv.num_free_blocks == 15 and kv.null_block.ref_cnt == 1  # the null block is never freed


def prefilled_and_dropped(kv, rid="a"):
    """A 20-token prompt computed, its 3 blocks out of the window released (block ids 1-5)."""
    r = req(rid, list(range(20)))
    compute(kv, r, 20)
    assert kv.drop_out_of_window(r) == 3
    return r


def test_dropped_blocks_stay_in_the_prefix_cache():
    kv = windowed()
    prefilled_and_dropped(kv)
    again = req("b", list(range(20)))
    hits, tokens = kv.get_computed_blocks(again)
    assert [b.block_id for b in hits] == [1, 2, 3, 4] and tokens == 16


def test_an_import_gets_blocks_for_its_live_tail_only():
    kv = windowed()
    r = req("a", list(range(20)))
    assert kv.adopt_imported(r, 20) == [1, 2]  # blocks 3 and 4 of the prompt: the transport fills these
    assert kv.block_ids("a") == [0, 0, 0, 1, 2]
    r.num_computed_tokens = 20
    kv.cache_computed_blocks(r)  # the null entries are not indexed
    assert sorted(b.block_id for b in kv.pool.cached.values()) == [1, 2]
    assert kv.drop_out_of_window(r) == 0
    kv.free("a")
    assert kv.num_free_blocks == 15


def test_a_fork_shares_live_blocks_and_keeps_the_null_entries():
    kv = windowed()
    parent = prefilled_and_dropped(kv)
    child = req("a#1", list(range(20)))
    assert kv.fork(parent, child) == (5, 6)  # the block holding the last prompt token is copied
    assert kv.block_ids("a#1") == [0, 0, 0, 4, 6]
    kv.free("a")
    kv.free("a#1")
    assert kv.num_free_blocks == 15


def test_without_a_window_nothing_is_dropped():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    r = req("a", list(range(40)))
    compute(kv, r, 40)
    assert kv.drop_out_of_window(r) == 0 and kv.adopt_imported(req("b", list(range(8))), 8) == [10, 11]
