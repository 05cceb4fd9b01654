"""Contract v2's Session on the worker: one router's streams over one gRPC stream, sent per engine step.

The router submits Generate and Decode requests (and cancellations), a burst of them per message.
Each runs as its own task over the same code as the per-request RPCs; its deltas go to an outbox, and
one writer sends everything in the outbox as a single SessionBatch. The engine hands a step's outputs
to the event loop in one callback (async_engine.py), so every stream's task runs before the writer
wakes: one message per step for all of them, decoded once by the router. When the router reads
slower than the engine produces, a batch simply carries several deltas per stream; a stream whose
unsent deltas exceed MAX_UNSENT is ended with RESOURCE_EXHAUSTED, which frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.common import role_pb
from triphase.workers.status import Status, status_of

logger = logging.getLogger(__name__)

MAX_STREAMS = 4096  # open streams per session; more are refused with RESOURCE_EXHAUSTED
MAX_UNSENT = 4096  # deltas of one stream waiting for the router to read

OpenStream = Callable[[pb.StreamRequest], AsyncGenerator[pb.TokenDelta, None]]


class Malformed(Exception):
    """A session request that does not parse, or names a stream that is open: the whole session ends
    with INVALID_ARGUMENT."""


class _Outbox:
    """Events not yet sent, at most one per stream, in the order their streams first had output."""

    def __init__(self) -> None:
        self.deltas: dict[int, list[pb.TokenDelta]] = {}
        self.ends: dict[int, pb.StreamError | None] = {}
        self.ready = asyncio.Event()

    def add(self, stream_id: int, delta: pb.TokenDelta) -> int:
        pending = self.deltas.setdefault(stream_id, [])
        pending.append(delta)
        self.ready.set()
        return len(pending)

    def end(self, stream_id: int, error: pb.StreamError | None) -> None:
        self.deltas.setdefault(stream_id, [])
        self.ends[stream_id] = error
        self.ready.set()

    def drop(self, stream_id: int) -> None:
        self.deltas.pop(stream_id, None)
        self.ends.pop(stream_id, None)

    def take(self) -> pb.SessionBatch:
        batch = pb.SessionBatch()
        ends = self.ends
        for stream_id, deltas in self.deltas.items():
            event = batch.events.add(stream_id=stream_id, deltas=deltas)
            if stream_id in ends:
                event.done = True
                if (error := ends[stream_id]) is not None:
                    event.error.CopyFrom(error)
        self.deltas, self.ends = {}, {}
        self.ready.clear()
        return batch


def stream_error(status: Status) -> pb.StreamError:
    return pb.StreamError(code=status.code.value[0], message=status.message, handed_over=status.handed_over,
                          role=role_pb.TO_PB[status.role] if status.role else pb.ROLE_UNSPECIFIED)


class Session:
    """`open_stream`: a submission's deltas (WorkerServicer.generate or .decode); what it raises ends
    the stream with status_of's code. Iterate `run` to serve the session."""

    def __init__(self, open_stream: OpenStream, *, max_streams: int = MAX_STREAMS,
                 max_unsent: int = MAX_UNSENT) -> None:
        self.open_stream = open_stream
        self.max_streams = max_streams
        self.max_unsent = max_unsent
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.outbox = _Outbox()

    async def run(self, requests: AsyncIterator[pb.SessionRequest]) -> AsyncGenerator[pb.SessionBatch, None]:
        """The batches to send until the router half-closes and every stream has ended (or the router
        goes away: then every open stream is aborted)."""
        reader = asyncio.create_task(self._read(requests))
        reader.add_done_callback(lambda _: self.outbox.ready.set())
        try:
            while True:
                await self.outbox.ready.wait()
                if self.outbox.deltas:
                    yield self.outbox.take()
                else:
                    self.outbox.ready.clear()
                if reader.done():
                    reader.result()  # Malformed, or the router's side failing, ends the session here
                    if not self.tasks and not self.outbox.deltas:
                        return
        finally:
            reader.cancel()
            tasks = [reader, *self.tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        async for message in requests:
            if not isinstance(message, pb.SessionRequest):
                raise Malformed(getattr(message, "reason", "not a SessionRequest"))
            if len(message.requests) > self.max_streams:  # bounded before any of them costs an event
                raise Malformed(f"a message carries at most {self.max_streams} requests")
            for request in message.requests:
                self._take(request)

    def _take(self, request: pb.StreamRequest) -> None:
        stream_id = request.stream_id
        kind = request.WhichOneof("kind")
        if kind == "cancel":
            task = self.tasks.pop(stream_id, None)
            if task is not None:
                task.cancel()
            self.outbox.drop(stream_id)
        elif stream_id in self.tasks:  # its events could not be told apart from the open stream's
            raise Malformed(f"stream {stream_id} is open already")
        elif len(self.tasks) >= self.max_streams:
            self._refuse(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"a session holds at most {self.max_streams} open streams")
        else:
            self.tasks[stream_id] = asyncio.create_task(self._serve(stream_id, request))

    def _refuse(self, stream_id: int, code: grpc.StatusCode, message: str) -> None:
        self.outbox.end(stream_id, pb.StreamError(code=code.value[0], message=message))

    async def _serve(self, stream_id: int, request: pb.StreamRequest) -> None:
        error: pb.StreamError | None = None
        try:
            async with contextlib.aclosing(self.open_stream(request)) as deltas:
                async for delta in deltas:
                    if self.outbox.add(stream_id, delta) > self.max_unsent:
                        raise MemoryError(f"the router left {self.max_unsent} deltas of this stream unread")
        except asyncio.CancelledError:  # cancelled by the router, or the session ended: no event
            self.tasks.pop(stream_id, None)
            raise
        except Exception as exc:
            status = status_of(exc)
            if status is None:
                logger.exception("Stream %d of a session failed", stream_id)
                status = Status(grpc.StatusCode.INTERNAL, "the worker failed serving this request")
            error = stream_error(status)
        self.tasks.pop(stream_id, None)
        self.outbox.end(stream_id, error)
