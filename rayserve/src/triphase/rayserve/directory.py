"""Which worker replicas exist, where they serve, and the role a new one starts in (pure: no Ray, no
clock of its own).

Serve places and restarts the worker replicas but does not say where each one listens, and the router
needs every worker's gRPC endpoint (it picks the worker itself: placement, hand-off and failover work on
endpoints, not on Serve's load-balanced handles). So each replica joins the directory before it loads
the model (and is told its first role), registers its endpoint once it serves, beats every
`HEARTBEAT_S`, and leaves when Serve stops it. A replica that dies without leaving (killed, its node
lost) is dropped once it has not beaten for `ttl_s`; until then the router's own health checks have
already stopped sending it work.

First roles. A replica alone in a deployment that may stay alone serves both roles; otherwise each
newcomer takes the role that brings the prefill share of prefill+decode workers nearest to
`prefill_share` (decode on a tie: decode capacity is what streams wait on). The roles workers serve
*now* come from the caller (the role balancer's view) when it has them, so a switch made at runtime
is counted as it stands, and a worker known to be down is not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from triphase.common.roles import Role

HEARTBEAT_S = 2.0


@dataclasses.dataclass
class Member:
    replica: str
    role: Role  # the role it joined with
    joined_at: float
    seen_at: float
    endpoint: str | None = None  # once it serves
    metrics_port: int | None = None
    pid: int | None = None  # the replica's process, on its node


class Directory:
    def __init__(self, prefill_share: float = 0.5, *, alone_serves_both: bool = True, ttl_s: float = 5 * HEARTBEAT_S):
        if not 0 < prefill_share < 1:
            raise ValueError("prefill_share must be in (0, 1)")
        self.prefill_share = prefill_share
        self.alone_serves_both = alone_serves_both
        self.ttl_s = ttl_s
        self.members: dict[str, Member] = {}

    def join(self, replica: str, now: float, roles_now: Mapping[str, Role | None] | None = None) -> Role:
        """The first role of `replica` (a replica that joins again, restarted under its id, gets it anew).
        `roles_now`: by endpoint, the role each worker serves now, None for one known to be down (a
        killed replica not yet expired: its replacement takes its role)."""
        self.expire(now)
        self.members.pop(replica, None)
        now_of = roles_now or {}
        roles = [role for m in self.members.values() if (role := now_of.get(m.endpoint or "", m.role)) is not None]
        if not roles and self.alone_serves_both:
            role = Role.BOTH
        else:
            prefill = sum(r == Role.PREFILL for r in roles)
            decode = sum(r == Role.DECODE for r in roles)
            if Role.BOTH in roles and not prefill and not decode:
                role = Role.DECODE  # a worker serving both and a second one: split the work
            else:
                total = prefill + decode + 1
                with_prefill = abs((prefill + 1) / total - self.prefill_share)
                with_decode = abs(prefill / total - self.prefill_share)
                role = Role.PREFILL if with_prefill < with_decode - 1e-9 else Role.DECODE  # a tie is decode's
        self.members[replica] = Member(replica, role, now, now)
        return role

    def register(self, replica: str, endpoint: str, metrics_port: int | None, pid: int | None, now: float) -> None:
        member = self.members.get(replica)
        if member is None:  # expired while loading, or the directory restarted: take it back as it is
            member = self.members[replica] = Member(replica, Role.BOTH, now, now)
        member.endpoint, member.metrics_port, member.pid, member.seen_at = endpoint, metrics_port, pid, now

    def beat(self, replica: str, now: float) -> bool:
        """False when the directory does not know `replica` (it restarted): the replica registers again."""
        member = self.members.get(replica)
        if member is None:
            return False
        member.seen_at = now
        return True

    def leave(self, replica: str) -> None:
        self.members.pop(replica, None)

    def expire(self, now: float) -> list[str]:
        gone = [r for r, m in self.members.items() if now - m.seen_at > self.ttl_s]
        for replica in gone:
            del self.members[replica]
        return gone

    def endpoints(self, now: float) -> list[str]:
        self.expire(now)
        return sorted(m.endpoint for m in self.members.values() if m.endpoint)
