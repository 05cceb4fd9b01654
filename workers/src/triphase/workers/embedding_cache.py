"""Image embeddings by content digest, in fixed slots of one buffer that peers can READ with NIXL.

Every image of a model has the same embedding shape, so the cache is an array of equal slots, each a
32-byte header (the digest of the image whose rows follow) and the rows. An encode worker tells a
prefill worker which slot holds an image; the prefill worker READs the slot straight into a slot of
its own cache and keeps it only if the header names the image it asked for (a slot reused in
between is then detected, not used). A slot written less than `lease_s` ago is not evicted, which is
the time a reader has. Least recently used slots are evicted first. Not thread-safe: one event loop
owns it; a NIXL READ writes only into a slot `reserve` set aside.
"""

from __future__ import annotations

import collections
import time

import torch

from triphase.workers.engine.model_runner import allocate_kv

HEADER = 32  # a sha256
ALIGN = 64


class EmbeddingCache:
    def __init__(self, capacity_bytes: int, rows: int, cols: int, dtype: torch.dtype, lease_s: float = 30.0) -> None:
        self.rows, self.cols, self.dtype = rows, cols, dtype
        self.row_bytes = rows * cols * torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = -(-(HEADER + self.row_bytes) // ALIGN) * ALIGN
        self.num_slots = max(0, capacity_bytes // self.slot_bytes) if self.row_bytes else 0
        self.buffer = allocate_kv((max(1, self.num_slots * self.slot_bytes),), torch.uint8)
        self.lease_s = lease_s
        self._slots: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # digest -> slot, LRU first
        self._free = list(range(self.num_slots))
        self._written: dict[int, float] = {}  # slot -> when it was last written

    def __len__(self) -> int:
        return len(self._slots)

    def _view(self, slot: int) -> torch.Tensor:
        return self.buffer[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def address(self, slot: int) -> int:
        return int(self.buffer.data_ptr()) + slot * self.slot_bytes

    def slot_of(self, key: bytes) -> int | None:
        return self._slots.get(key)

    def get(self, key: bytes) -> torch.Tensor | None:
        """A copy of the image's rows (the slot may be reused while the caller still computes)."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._slots.move_to_end(key)
        raw = self._view(slot)[HEADER : HEADER + self.row_bytes]
        return raw.view(self.dtype).view(self.rows, self.cols).clone()

    def put(self, key: bytes, rows: torch.Tensor) -> int | None:
        """Store an image's rows; returns the slot, or None when every slot is leased (or the rows do
        not have the model's shape)."""
        if tuple(rows.shape) != (self.rows, self.cols) or len(key) != HEADER:
            return None
        slot = self._slots.get(key)
        if slot is None:
            slot = self.reserve()
            if slot is None:
                return None
        view = self._view(slot)
        view[:HEADER] = 0  # a reader racing this write sees no valid header
        view[HEADER : HEADER + self.row_bytes] = rows.to(self.dtype).contiguous().view(-1).view(torch.uint8)
        view[:HEADER] = torch.frombuffer(bytearray(key), dtype=torch.uint8)
        return self._commit(key, slot)

    def reserve(self) -> int | None:
        """A slot to write into (for `put`, or a NIXL READ then `accept`): free, or the least recently
        used one whose lease is over; None when there is none."""
        if self._free:
            return self._free.pop()
        now = time.monotonic()
        for key, slot in self._slots.items():
            if now - self._written.get(slot, 0.0) >= self.lease_s:
                del self._slots[key]
                return slot
        return None

    def accept(self, key: bytes, slot: int) -> torch.Tensor | None:
        """A reserved slot filled by a READ: kept if its header names `key`, else given back."""
        if bytes(self._view(slot)[:HEADER].numpy()) != key:
            self.release(slot)
            return None
        self._commit(key, slot)
        return self.get(key)

    def release(self, slot: int) -> None:
        """Give back a reserved slot that was not filled."""
        self._free.append(slot)

    def _commit(self, key: bytes, slot: int) -> int:
        self._slots[key] = slot
        self._slots.move_to_end(key)
        self._written[slot] = time.monotonic()
        return slot
