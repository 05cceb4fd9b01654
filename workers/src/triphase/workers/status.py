"""Which gRPC status ends a call (or a Session's stream) that raised: one map for every method.

INVALID_ARGUMENT for bad input, NOT_FOUND for unknown pinned KV, RESOURCE_EXHAUSTED when the KV cache
has no room, FAILED_PRECONDITION when the role or drain state refuses the call (the role in trailing
metadata), UNAVAILABLE while the role is switching or the engine is not healthy, and for streams
handed over by a switch, a balancer or a shutdown (marked in trailing metadata), ABORTED when a
Decode could not obtain its KV, PERMISSION_DENIED when a ticket does not hold, INTERNAL when the engine
failed computing the request (the message never carries internal exception text).
"""

from __future__ import annotations

import dataclasses

import grpc

from triphase.common.roles import HANDED_OVER_METADATA, ROLE_METADATA, Role
from triphase.workers.engine.async_engine import EngineFailed
from triphase.workers.kv.handoff import HandOffFailed
from triphase.workers.roles import HandedOver, Refused
from triphase.workers.signing import TicketRefused


@dataclasses.dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str
    handed_over: bool = False  # the stream was given back for the router to resume elsewhere
    role: Role | None = None  # the role that refused the call

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The marks as a per-request RPC's trailing metadata."""
        marks = ((HANDED_OVER_METADATA, "1"),) if self.handed_over else ()
        return marks + (((ROLE_METADATA, str(self.role)),) if self.role else ())


def status_of(exc: BaseException) -> Status | None:
    """The status for `exc`; None for an exception that is not the caller's to see (a bug: it propagates)."""
    message = str(exc)
    if isinstance(exc, HandedOver):
        return Status(grpc.StatusCode.UNAVAILABLE, message, handed_over=True)
    if isinstance(exc, Refused):
        code = grpc.StatusCode.UNAVAILABLE if exc.transient else grpc.StatusCode.FAILED_PRECONDITION
        return Status(code, message, role=exc.role)
    if isinstance(exc, KeyError):
        return Status(grpc.StatusCode.NOT_FOUND, str(exc.args[0] if exc.args else exc))
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return Status(code, message)
    return None


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (HandOffFailed, grpc.StatusCode.ABORTED),
    (TicketRefused, grpc.StatusCode.PERMISSION_DENIED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineFailed, grpc.StatusCode.INTERNAL),
)
