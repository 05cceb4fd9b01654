"""The pairing policy: where a request prefills and decodes, from worker snapshots."""

from __future__ import annotations

import collections
import dataclasses

from triphase.common.roles import Role
from triphase.router.policy.pairing import WorkerView, select


def view(name: str, role: Role, **kw: object) -> WorkerView:
    return WorkerView(name, f"{name}:1", role, free_blocks=100, total_blocks=100, **kw)  # type: ignore[arg-type]


def test_a_burst_spreads_over_workers_whose_reports_have_not_caught_up() -> None:
    """Eight requests placed before any worker reports again: the router's own outstanding counts
    spread them two per prefill worker and two per decode worker (the reports alone would send all
    eight to the first of each)."""
    workers = {w.endpoint: w for w in [view(f"p{i}", Role.PREFILL) for i in range(4)]
               + [view(f"d{i}", Role.DECODE) for i in range(4)]}
    prefills: collections.Counter[str] = collections.Counter()
    decodes: collections.Counter[str] = collections.Counter()
    for i in range(8):
        placement = select([1000 + i], list(workers.values()))
        assert placement is not None and placement.prefill is not None
        p, d = placement.prefill, placement.decode
        prefills[p.worker_id] += 1
        decodes[d.worker_id] += 1
        workers[p.endpoint] = dataclasses.replace(p, outstanding_prefill_tokens=p.outstanding_prefill_tokens + 500)
        workers[d.endpoint] = dataclasses.replace(d, outstanding_streams=d.outstanding_streams + 1)
    assert sorted(prefills.values()) == [2, 2, 2, 2] and sorted(decodes.values()) == [2, 2, 2, 2]


def test_a_report_above_the_routers_own_count_wins() -> None:
    """Another router's load shows only in the worker's report."""
    busy = view("p0", Role.PREFILL, queued_prefill_tokens=5000, outstanding_prefill_tokens=100)
    idle = view("p1", Role.PREFILL, outstanding_prefill_tokens=600)
    placement = select([7], [busy, idle, view("d0", Role.DECODE)])
    assert placement is not None and placement.prefill is not None and placement.prefill.worker_id == "p1"


def test_the_prefix_cache_outweighs_a_small_queue_only() -> None:
    cached = view("p0", Role.PREFILL, cached_hashes=frozenset({1, 2}), outstanding_prefill_tokens=300)
    other = view("p1", Role.PREFILL)
    placement = select([1, 2, 3], [cached, other, view("d0", Role.DECODE)])
    assert placement is not None and placement.prefill is not None and placement.prefill.worker_id == "p0"
    swamped = dataclasses.replace(cached, outstanding_prefill_tokens=5000)
    placement = select([1, 2, 3], [swamped, other, view("d0", Role.DECODE)])
    assert placement is not None and placement.prefill is not None and placement.prefill.worker_id == "p1"
