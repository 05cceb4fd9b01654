"""Block pool: reference counts, the free queue's order, prefix-cache indexing and eviction."""

import pytest

from triphase.workers.engine.block_pool import BlockPool, NoFreeBlocks, hash_block_tokens


def test_allocate_takes_blocks_in_queue_order():
    pool = BlockPool(4)
    assert [b.block_id for b in pool.allocate(3)] == [0, 1, 2]
    assert pool.free_ids() == [3]
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)


def test_release_appends_in_given_order_and_counts_refs():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.touch([b])
    pool.release([c, b, a])
    assert pool.free_ids() == [3, 2, 0]  # b still referenced once
    assert b.ref_cnt == 1
    pool.release([b])
    assert pool.free_ids() == [3, 2, 0, 1]


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(RuntimeError, match="double free"):
        pool.release([a])


def test_cached_free_block_is_reused_by_touch_and_evicted_by_allocate():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache(a, h)
    pool.release([b, a])
    assert pool.lookup(h) is a
    pool.touch([a])  # a prefix hit takes it back out of the free queue
    assert pool.free_ids() == [2, 1]
    pool.release([a])
    # Allocation walks the queue: 2, 1, then a (block 0), evicting its cached hash.
    assert [x.block_id for x in pool.allocate(3)] == [2, 1, 0]
    assert pool.lookup(h) is None
    assert pool.num_evictions == 1


def test_first_writer_wins_for_duplicate_hashes():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, 7)
    pool.cache(b, 7)
    assert pool.lookup(7) is a
    assert b.block_hash is None


def test_hash_is_chained_and_stable():
    h1 = hash_block_tokens(None, [1, 2])
    assert h1 == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert h1 == 8901564848246840783  # fixed across processes and runs (blake2b, not hash())


def test_disabled_caching_never_indexes():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, 5)
    assert pool.lookup(5) is None
