"""Admission control: at most `max_in_flight` requests run; up to `max_queued` more wait, in
arrival order, for at most `max_wait_s`. A request that finds the queue full, or waits too long,
is refused with `Overloaded` (a 429 with Retry-After): clients back off instead of piling up.

Pure asyncio, no I/O: the HTTP layer wraps each request in `slot()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from triphase.router.errors import Overloaded


class Admission:
    def __init__(self, max_in_flight: int, max_queued: int, max_wait_s: float = 30.0) -> None:
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queued >= 0")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body; waits in the queue when all are taken."""
        if self.running >= self.max_in_flight or self._waiters:
            await self._wait()
        else:
            self.running += 1
        try:
            yield
        finally:
            self._release()

    async def _wait(self) -> None:
        if len(self._waiters) >= self.max_queued:
            raise Overloaded(f"{self.running} requests running and {len(self._waiters)} queued; retry shortly")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.max_wait_s):
                await waiter
        except BaseException as exc:  # timed out, or the client went away
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed to us as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise Overloaded(f"waited {self.max_wait_s:g} s for a free slot; retry shortly") from None
            raise

    def _release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

