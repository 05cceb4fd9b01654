"""Roles on the wire: `Role` <-> the protobuf `Role` enum, one map for the worker, the router and the
control loops. (A module of its own: the pure control policies import `roles` and must not pull in
protobuf.)"""

from __future__ import annotations

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.roles import Role

TO_PB = {Role.ENCODE: pb.ROLE_ENCODE, Role.PREFILL: pb.ROLE_PREFILL, Role.DECODE: pb.ROLE_DECODE,
         Role.BOTH: pb.ROLE_BOTH}
FROM_PB = {v: k for k, v in TO_PB.items()}


def from_pb(value: int) -> Role:
    """A reported role; an unknown value (a newer worker's) is read as BOTH, which may do anything."""
    return FROM_PB.get(value, Role.BOTH)
