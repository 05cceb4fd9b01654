"""Choose the prefill and decode workers for a request, as a pair.

Pure: a function of the request's block hashes and a snapshot of worker state; no I/O. Prefill
goes where the prompt's prefix is cached, unless that worker is much busier than the least loaded
one (overlap is worth `CACHE_WEIGHT` queued tokens per block). Decode goes to the decode-capable
worker with the most free KV per running request. Without a prefill-capable worker other than the
decode choice, the decode worker prefills locally (prefill = None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from triphase.common.roles import Role


@dataclasses.dataclass(frozen=True)
class WorkerView:
    worker_id: str
    endpoint: str
    role: Role
    healthy: bool = True
    draining: bool = False
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 1
    queued_prefill_tokens: int = 0
    block_size: int = 16
    cached_hashes: frozenset[int] = frozenset()

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining


@dataclasses.dataclass(frozen=True)
class Placement:
    decode: WorkerView
    prefill: WorkerView | None  # None: the decode worker prefills itself
    cached_blocks: int = 0


CACHE_WEIGHT = 16


def cached_prefix(view: WorkerView, hashes: Sequence[int]) -> int:
    count = 0
    for h in hashes:
        if h not in view.cached_hashes:
            break
        count += 1
    return count


def select(hashes: Sequence[int], workers: Sequence[WorkerView], exclude: frozenset[str] = frozenset(),
           ) -> Placement | None:
    """The placement for a prompt with these block hashes, or None if no worker can decode."""
    usable = [w for w in workers if w.available and w.worker_id not in exclude]
    decoders = [w for w in usable if w.role.can_decode]
    if not decoders:
        return None
    dedicated_decoders = [w for w in decoders if w.role is Role.DECODE] or decoders
    decode = max(dedicated_decoders, key=lambda w: (w.free_blocks / (1 + w.running + w.waiting), -w.running))
    prefillers = [w for w in usable if w.role.can_prefill and w.worker_id != decode.worker_id]
    if not prefillers:
        return Placement(decode, None, cached_prefix(decode, hashes))

    def score(w: WorkerView) -> float:
        return cached_prefix(w, hashes) * CACHE_WEIGHT * w.block_size - w.queued_prefill_tokens - 64 * w.waiting

    prefill = max(prefillers, key=score)
    return Placement(decode, prefill, cached_prefix(prefill, hashes))
