"""The three routing policies on worker snapshots: which decode and prefill worker each picks."""

from __future__ import annotations

import pytest

from triphase.common.roles import Role
from triphase.router.policy.pairing import WorkerView
from triphase.router.policy.routing import POLICIES

HASHES = [11, 12, 13, 14]
# p1 holds the prompt's prefix and is busier; p2 is idle. d1 has more free KV per stream; d2 fewer streams.
WORKERS = [
    WorkerView("p1", "p1:1", Role.PREFILL, queued_prefill_tokens=200, cached_hashes=frozenset(HASHES)),
    WorkerView("p2", "p2:1", Role.PREFILL, queued_prefill_tokens=0),
    WorkerView("d1", "d1:1", Role.DECODE, running=4, free_blocks=900, total_blocks=1000),
    WorkerView("d2", "d2:1", Role.DECODE, running=2, free_blocks=100, total_blocks=1000),
]


@pytest.mark.parametrize("policy, decode, prefill", [
    ("kv-aware", "d1", "p1"),  # the cached prefix outweighs 200 queued tokens; most free KV per stream
    ("least-loaded", "d2", "p2"),  # the cache ignored: fewest streams, fewest queued tokens
])
def test_each_policy_picks_by_its_rule(policy, decode, prefill):
    placement = POLICIES[policy].select(HASHES, WORKERS)
    assert (placement.decode.worker_id, placement.prefill.worker_id) == (decode, prefill)
    assert placement.cached_blocks == (4 if prefill == "p1" else 0)


def test_round_robin_takes_each_worker_in_turn_whatever_its_load():
    chosen = [POLICIES["round-robin"].select(HASHES, WORKERS, turn=turn) for turn in range(4)]
    assert [(p.decode.worker_id, p.prefill.worker_id) for p in chosen] == \
        [("d1", "p1"), ("d2", "p2"), ("d1", "p1"), ("d2", "p2")]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_respects_exclusions_health_and_roles(policy):
    rule = POLICIES[policy]
    placement = rule.select(HASHES, WORKERS, exclude=frozenset({"d1", "p1"}))
    assert (placement.decode.worker_id, placement.prefill.worker_id) == ("d2", "p2")
    sick = [WorkerView(w.worker_id, w.endpoint, w.role, healthy=w.worker_id != "d2") for w in WORKERS]
    assert all(rule.select(HASHES, sick, turn=t).decode.worker_id == "d1" for t in range(3))
    assert rule.select(HASHES, [w for w in WORKERS if w.role is Role.PREFILL]) is None  # nobody can decode
    both = [WorkerView("b", "b:1", Role.BOTH)]
    alone = rule.select(HASHES, both)
    assert alone.decode.worker_id == "b" and alone.prefill is None  # it prefills itself
    assert rule.select_prefill(HASHES, WORKERS, "d1", exclude=frozenset({"p1", "p2"})) is None
