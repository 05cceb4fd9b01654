"""Worker roles, and the gRPC metadata that reports them (their Kubernetes labels: labels.py)."""

from __future__ import annotations

import enum

# Trailing gRPC metadata on the UNAVAILABLE that ends a stream a worker handed over (a role switch,
# a shutdown, load balancing): the router resumes it elsewhere without counting a failure.
HANDED_OVER_METADATA = "triphase-handed-over"
# Trailing gRPC metadata on the FAILED_PRECONDITION of a call the worker's role does not allow: the role it
# has now, so the router corrects its view of the worker (a role switch it has not seen yet) instead of
# counting a failure.
ROLE_METADATA = "triphase-role"


class Role(enum.StrEnum):
    """What a worker does with a request; a worker's role can change at runtime."""

    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def can_prefill(self) -> bool:
        return self in (Role.PREFILL, Role.BOTH)

    @property
    def can_decode(self) -> bool:
        return self in (Role.DECODE, Role.BOTH)
