"""The worker replicas' directory: first roles, registration, heartbeats and expiry (exact, no Ray)."""

from __future__ import annotations

import pytest

from triphase.common.roles import Role
from triphase.rayserve.directory import Directory

D, P, B = Role.DECODE, Role.PREFILL, Role.BOTH


@pytest.mark.parametrize(("share", "alone", "expected"), [
    (0.5, False, [D, P, D, P, D, P]),  # ties go to decode
    (0.25, False, [D, D, P, D, D, D, P, D]),
    (0.75, False, [P, D, P, P, P, D, P, P]),
    (0.5, True, [B, D, P, D]),  # alone: both roles; the next one takes decode, leaving prefill to share
])
def test_first_roles_keep_the_prefill_share(share, alone, expected) -> None:
    directory = Directory(share, alone_serves_both=alone)
    assert [directory.join(f"r{i}", now=0.0) for i in range(len(expected))] == expected


def test_roles_served_now_count_instead_of_first_roles() -> None:
    directory = Directory(0.5, alone_serves_both=False)
    assert directory.join("a", 0.0) == D
    directory.register("a", "h:1", 9, 11, 0.0)
    assert directory.join("b", 0.0) == P
    directory.register("b", "h:2", 9, 12, 0.0)
    # the balancer moved "a" to prefill: the next worker is decode again
    assert directory.join("c", 0.0, roles_now={"h:1": P}) == D


def test_a_worker_known_to_be_down_is_replaced_in_its_role() -> None:
    directory = Directory(0.5, alone_serves_both=False)
    for i, replica in enumerate("abc"):
        directory.join(replica, 0.0)
        directory.register(replica, f"h:{i}", 9, i, 0.0)
    assert [m.role for m in directory.members.values()] == [D, P, D]
    # "c" was killed and has not expired: counted, the newcomer would be prefill; known down, decode
    assert directory.join("x", 1.0) == P
    assert directory.join("x", 1.0, roles_now={"h:2": None}) == D


def test_registration_heartbeats_and_expiry() -> None:
    directory = Directory(0.5, alone_serves_both=False, ttl_s=10)
    directory.join("a", 0.0)
    directory.join("b", 0.0)
    assert directory.endpoints(0.0) == []  # loading: known, not yet serving
    directory.register("b", "h:2", None, None, 1.0)
    directory.register("a", "h:1", None, None, 1.0)
    assert directory.endpoints(1.0) == ["h:1", "h:2"]
    assert directory.beat("a", 9.0)
    assert directory.endpoints(11.5) == ["h:1"]  # b beat last at 1.0: dropped after 10 s
    assert not directory.beat("b", 11.5)  # forgotten: it registers again
    directory.register("b", "h:3", None, None, 12.0)  # restarted elsewhere
    assert directory.endpoints(12.0) == ["h:1", "h:3"]
    directory.leave("a")
    assert directory.endpoints(12.0) == ["h:3"]


def test_a_replica_that_joins_again_gets_a_role_anew() -> None:
    directory = Directory(0.5, alone_serves_both=False)
    assert [directory.join(r, 0.0) for r in ("a", "b")] == [D, P]
    assert directory.join("b", 0.0) == P  # the same count without its old entry
    assert len(directory.members) == 2


def test_share_bounds() -> None:
    with pytest.raises(ValueError, match="prefill_share"):
        Directory(1.0)
