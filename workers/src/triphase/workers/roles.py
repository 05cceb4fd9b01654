"""A worker's role and admission state: what it accepts, what is in flight, and how it switches.

The state the role balancer acts on. `admit` is the gate every RPC passes: a worker that is
switching, or whose engine is not healthy, refuses with a transient error (the router tries
elsewhere at once); one that is draining, or whose role does not allow the work, refuses for good.
A switch stops admitting, lets the work the new role does not allow finish for up to the grace
period (decoding streams, prefills in progress), hands over the streams left (`interrupt`: they end
with a transient error and the router resumes them elsewhere), changes the role and admits again.
Pinned prefill KV is left alone: its reader, or the pin timeout, frees it. Shutdown drains the same
way. No gRPC here: server.py maps `Refused` to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from triphase.common.roles import Role

MAX_REQUEST_ID_CHARS = 256


class Refused(Exception):
    """Work this worker will not take now. `transient`: it may take it again shortly (switching, a
    stalled engine), so the caller should try another worker."""

    def __init__(self, message: str, *, transient: bool, role: Role | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.role = role  # set when the worker's role does not allow the call: the role it has


class HandedOver(Refused):
    """A running stream this worker gives back for the router to resume elsewhere: not a failure."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class RoleState:
    def __init__(self, worker_id: str, role: Role, on_change: Callable[[], None] = lambda: None) -> None:
        self.worker_id = worker_id
        self.role = role
        self.on_change = on_change  # the state changed: publish stats now
        self.draining = False
        self.switching = False
        # Decoding streams (Generate or Decode) by request id, in the order they started: (prompt
        # tokens, max new tokens, whether it may move for balance), what a hand-over looks at.
        self.streams: dict[str, tuple[int, int, bool]] = {}
        self.prefills = 0
        self.stream_done = asyncio.Event()

    def admit(self, request_id: str, engine_health: str, *, needs_prefill: bool = False,
              needs_decode: bool = False, needs_encode: bool = False) -> None:
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
        if engine_health != "ok":
            raise Refused(f"worker {self.worker_id}: engine {engine_health}", transient=True)
        if self.draining:
            raise Refused(f"worker {self.worker_id} is draining", transient=False)
        if self.switching:
            raise Refused(f"worker {self.worker_id} is switching its role", transient=True)
        if needs_prefill and not self.role.can_prefill:
            raise Refused(f"worker {self.worker_id} is {self.role}, not prefill", transient=False, role=self.role)
        if needs_decode and not self.role.can_decode:
            raise Refused(f"worker {self.worker_id} is {self.role}, not decode", transient=False, role=self.role)
        if needs_encode and self.role is not Role.ENCODE:
            raise Refused(f"worker {self.worker_id} is {self.role}, not encode", transient=False, role=self.role)

    @contextlib.contextmanager
    def tracked(self, request_id: str, prompt_tokens: int = 0, max_tokens: int = 0, movable: bool = True,
                ) -> Iterator[None]:
        """A decoding stream, which a switch or a shutdown waits for or hands over (and, if
        `movable`, a hand-over for balance may move; a stream resumed here has moved once)."""
        self.streams[request_id] = (prompt_tokens, max_tokens, movable)
        try:
            yield
        finally:
            self.streams.pop(request_id, None)
            self.stream_done.set()

    def movable(self, count: int, max_context_tokens: int, min_new_tokens: int) -> list[str]:
        """Up to `count` streams to hand over for balance: the newest first, whose prompt + max new
        tokens fit `max_context_tokens` and whose max new tokens are at least `min_new_tokens`."""
        if self.switching or self.draining or not self.role.can_decode:
            return []
        fits = [rid for rid, (prompt, new, movable) in reversed(self.streams.items())
                if movable and prompt + new <= max_context_tokens and new >= min_new_tokens]
        return fits[:count]

    @contextlib.contextmanager
    def prefilling(self) -> Iterator[None]:
        self.prefills += 1
        try:
            yield
        finally:
            self.prefills -= 1
            self.stream_done.set()

    def drain(self) -> None:
        self.draining = True
        self.on_change()

    async def switch(self, target: Role, grace_s: float, interrupt: Callable[[str, str], bool]) -> tuple[Role, int]:
        """Switch to `target`; returns (previous role, streams handed over). `interrupt(request_id,
        reason)` ends one stream with a transient error (False if it had ended)."""
        if self.switching:
            raise Refused("a role switch is already in progress", transient=False)
        previous = self.role
        if target == previous:
            return previous, 0
        self.switching = True
        self.on_change()
        try:
            handed_over = await self.settle(grace_s, keeps_decoding=target.can_decode,
                                            keeps_prefilling=target.can_prefill, interrupt=interrupt,
                                            reason=f"switched to {target}")
            self.role = target
        finally:
            self.switching = False
            self.on_change()
        return previous, handed_over

    async def settle(self, grace_s: float, *, keeps_decoding: bool, keeps_prefilling: bool,
                     interrupt: Callable[[str, str], bool], reason: str = "shutting down") -> int:
        """Wait up to `grace_s` for the work that is to stop (decoding streams, prefills); hand over
        the streams left. Returns how many were handed over."""
        def blocking() -> bool:
            return (bool(self.streams) and not keeps_decoding) or (self.prefills > 0 and not keeps_prefilling)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while blocking():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.stream_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stream_done.wait(), timeout=min(remaining, 0.5))
        if keeps_decoding:
            return 0
        handed = [rid for rid in list(self.streams) if interrupt(rid, f"worker {self.worker_id} {reason}")]
        while any(rid in self.streams for rid in handed):  # they end at their next engine step
            self.stream_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stream_done.wait(), timeout=0.5)
        return len(handed)
