"""KV manager: slot allocation per request, prefix-cache hits with exact block ids, freeing."""

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
