"""The routing policies a ServingDeployment may choose (`router.routingPolicy`, `--routing-policy`),
behind one interface: given a request's block hashes, a snapshot of the workers and the router's turn
counter, pick the decode worker and the prefill worker (None: the decode worker prefills itself).

- `kv-aware` (the default, pairing.py): prefill where the prompt's prefix is cached unless that worker
  is much busier; decode where free KV per running request is largest.
- `least-loaded`: the cache ignored; prefill on the worker with the fewest queued prompt tokens,
  decode on the one with the fewest streams (most free KV breaking ties).
- `round-robin`: load and cache ignored; the candidates in turn, by worker id.

Pure: no I/O, no state of their own (the turn comes from the caller). The candidates are the same for
all three (pairing.decoders and pairing.prefillers); only the choice among them differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from triphase.router.policy import pairing
from triphase.router.policy.pairing import Placement, WorkerView


class RoutingPolicy(Protocol):
    name: str

    def select(self, hashes: Sequence[int], workers: Sequence[WorkerView], exclude: frozenset[str] = frozenset(),
               turn: int = 0) -> Placement | None:
        """Where to run a request; None when no worker can decode it."""

    def select_prefill(self, hashes: Sequence[int], workers: Sequence[WorkerView], decode_id: str,
                       exclude: frozenset[str] = frozenset(), turn: int = 0) -> WorkerView | None:
        """Another prefill worker for a request decoded on `decode_id` (its first one failed)."""


class KvAware:
    name = "kv-aware"

    def select(self, hashes: Sequence[int], workers: Sequence[WorkerView], exclude: frozenset[str] = frozenset(),
               turn: int = 0) -> Placement | None:
        return pairing.select(hashes, workers, exclude)

    def select_prefill(self, hashes: Sequence[int], workers: Sequence[WorkerView], decode_id: str,
                       exclude: frozenset[str] = frozenset(), turn: int = 0) -> WorkerView | None:
        return pairing.select_prefill(hashes, workers, decode_id, exclude)


class _ByKey:
    """Choose the decode worker, then the prefill worker, each by its own rule over the candidates."""

    name = ""

    def _decode(self, candidates: list[WorkerView], turn: int) -> WorkerView:
        raise NotImplementedError

    def _prefill(self, candidates: list[WorkerView], turn: int) -> WorkerView:
        raise NotImplementedError

    def select(self, hashes: Sequence[int], workers: Sequence[WorkerView], exclude: frozenset[str] = frozenset(),
               turn: int = 0) -> Placement | None:
        candidates = pairing.decoders(workers, exclude)
        if not candidates:
            return None
        decode = self._decode(candidates, turn)
        prefill = self.select_prefill(hashes, workers, decode.worker_id, exclude, turn)
        return Placement(decode, prefill, pairing.cached_prefix(prefill or decode, hashes))

    def select_prefill(self, hashes: Sequence[int], workers: Sequence[WorkerView], decode_id: str,
                       exclude: frozenset[str] = frozenset(), turn: int = 0) -> WorkerView | None:
        candidates = pairing.prefillers(workers, decode_id, exclude)
        return self._prefill(candidates, turn) if candidates else None


class LeastLoaded(_ByKey):
    name = "least-loaded"

    def _decode(self, candidates: list[WorkerView], turn: int) -> WorkerView:
        return min(candidates, key=lambda w: (w.decode_load, -w.free_blocks, w.worker_id))

    def _prefill(self, candidates: list[WorkerView], turn: int) -> WorkerView:
        return min(candidates, key=lambda w: (w.prefill_load, w.waiting, w.worker_id))


class RoundRobin(_ByKey):
    name = "round-robin"

    def _decode(self, candidates: list[WorkerView], turn: int) -> WorkerView:
        return sorted(candidates, key=lambda w: w.worker_id)[turn % len(candidates)]

    _prefill = _decode


POLICIES: dict[str, RoutingPolicy] = {p.name: p for p in (KvAware(), LeastLoaded(), RoundRobin())}
