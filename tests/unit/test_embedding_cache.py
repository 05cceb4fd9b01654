"""The embedding cache's slots: a digest header and the rows, LRU eviction except within the lease a
reader has, and a READ into a slot kept only if its header names the image asked for."""

from __future__ import annotations

import torch

from triphase.workers.embedding_cache import HEADER, EmbeddingCache


def rows(value: float) -> torch.Tensor:
    return torch.full((3, 4), value, dtype=torch.bfloat16)


def key(n: int) -> bytes:
    return bytes([n]) * HEADER


def test_put_get_and_the_slot_layout():
    cache = EmbeddingCache(1 << 10, 3, 4, torch.bfloat16, lease_s=0)
    slot = cache.put(key(1), rows(1.5))
    assert cache.get(key(1)).equal(rows(1.5)) and cache.get(key(2)) is None
    raw = cache.buffer[slot * cache.slot_bytes : (slot + 1) * cache.slot_bytes]
    assert bytes(raw[:HEADER].numpy()) == key(1)  # what a reader checks after a READ
    assert cache.slot_bytes % 64 == 0 and cache.slot_bytes >= HEADER + 3 * 4 * 2
    assert cache.put(key(3), torch.zeros(2, 4)) is None  # not this model's shape


def test_least_recently_used_goes_first_but_not_within_its_lease():
    cache = EmbeddingCache(3 * 64, 3, 4, torch.bfloat16, lease_s=0)  # 64-byte slots: three of them
    assert cache.num_slots == 3
    for n in (1, 2, 3):
        cache.put(key(n), rows(n))
    cache.get(key(1))  # 2 is now the least recently used
    cache.put(key(4), rows(4))
    assert cache.get(key(2)) is None and all(cache.get(key(n)) is not None for n in (1, 3, 4))
    leased = EmbeddingCache(2 * 64, 3, 4, torch.bfloat16, lease_s=60)
    leased.put(key(1), rows(1))
    leased.put(key(2), rows(2))
    assert leased.put(key(3), rows(3)) is None and len(leased) == 2  # both still leased to readers


def test_a_read_into_a_reserved_slot_is_kept_only_for_the_right_image():
    source = EmbeddingCache(4 * 64, 3, 4, torch.bfloat16, lease_s=0)
    slot = source.put(key(7), rows(7))

    def read(reader: EmbeddingCache, into: int) -> None:  # what the NIXL READ does: header and rows
        size = reader.slot_bytes
        reader.buffer[into * size : (into + 1) * size] = source.buffer[slot * size : (slot + 1) * size]

    reader = EmbeddingCache(4 * 64, 3, 4, torch.bfloat16, lease_s=0)
    good = reader.reserve()
    read(reader, good)
    assert reader.accept(key(7), good).equal(rows(7))

    source.put(key(8), rows(8))  # the source has reused image 7's slot for image 8 ...
    source.buffer[slot * source.slot_bytes : slot * source.slot_bytes + HEADER] = \
        torch.frombuffer(bytearray(key(8)), dtype=torch.uint8)
    late = EmbeddingCache(4 * 64, 3, 4, torch.bfloat16, lease_s=0)  # ... before this reader came for 7
    stale = late.reserve()
    read(late, stale)
    assert late.accept(key(7), stale) is None and late.get(key(7)) is None
    assert late.reserve() == stale  # the slot was given back
