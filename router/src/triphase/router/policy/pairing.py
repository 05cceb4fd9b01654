"""Choose the prefill and decode workers for a request, as a pair.

Pure: a function of the request's block hashes and a snapshot of worker state; no I/O. Prefill
goes where the prompt's prefix is cached, unless that worker is much busier than the least loaded
one (overlap is worth `CACHE_WEIGHT` queued tokens per block). Decode goes to the decode-capable
worker with the most free KV per running request. Without a prefill-capable worker other than the
decode choice, the decode worker prefills locally (prefill = None).

A worker's load is the larger of what it last reported and what this router has sent it and not
yet seen finish (`outstanding_*`): reports lag (a worker in a long step reports nothing, and has not
even queued what arrived meanwhile), and without the router's own count a burst would all go to
the worker that looked idlest when it began.
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
    outstanding_prefill_tokens: int = 0  # prompt tokens this router sent it to prefill, not yet returned
    outstanding_streams: int = 0  # requests this router is streaming from it

    @property
    def decode_load(self) -> int:
        return max(self.running + self.waiting, self.outstanding_streams)

    @property
    def prefill_load(self) -> int:
        return max(self.queued_prefill_tokens, self.outstanding_prefill_tokens)

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


def decoders(workers: Sequence[WorkerView], exclude: frozenset[str] = frozenset()) -> list[WorkerView]:
    """The workers a request may decode on: available decode-capable ones not excluded, dedicated
    decode workers only when there are any (a `both` worker then prefills)."""
    able = [w for w in workers if w.available and w.worker_id not in exclude and w.role.can_decode]
    return [w for w in able if w.role is Role.DECODE] or able


def prefillers(workers: Sequence[WorkerView], decode_id: str, exclude: frozenset[str] = frozenset(),
               ) -> list[WorkerView]:
    """The workers that may prefill a request decoded on `decode_id` (never that worker itself)."""
    return [w for w in workers if w.available and w.role.can_prefill and w.worker_id != decode_id
            and w.worker_id not in exclude]


def select(hashes: Sequence[int], workers: Sequence[WorkerView], exclude: frozenset[str] = frozenset(),
           ) -> Placement | None:
    """The placement for a prompt with these block hashes, or None if no worker can decode."""
    candidates = decoders(workers, exclude)
    if not candidates:
        return None
    decode = max(candidates, key=lambda w: (w.free_blocks / (1 + w.decode_load), -w.decode_load))
    usable = [w for w in workers if w.worker_id not in exclude]
    prefill = select_prefill(hashes, usable, decode.worker_id)
    return Placement(decode, prefill, cached_prefix(prefill or decode, hashes))


def select_prefill(hashes: Sequence[int], workers: Sequence[WorkerView], decode_id: str,
                   exclude: frozenset[str] = frozenset()) -> WorkerView | None:
    """The prefill worker for a request decoded on `decode_id`: the longest cached prefix, less load;
    None when only the decode worker itself could prefill."""
    candidates = prefillers(workers, decode_id, exclude)
    if not candidates:
        return None

    def score(w: WorkerView) -> float:
        return cached_prefix(w, hashes) * CACHE_WEIGHT * w.block_size - w.prefill_load - 64 * w.waiting

    return max(candidates, key=score)
