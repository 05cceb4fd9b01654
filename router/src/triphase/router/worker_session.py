"""Contract v2 on the router: one Session per worker carries every stream this router has there.

A request's Generate or Decode is a submission on the session, its end a cancellation; the worker
answers with one SessionBatch per engine step holding the deltas of all of this router's requests on
it. One reader task per session decodes each batch once and hands every stream its deltas without
waiting on anyone: a client that reads slowly only lengthens its own queue. A queue longer than
MAX_BEHIND deltas cuts that client (SlowReader) and cancels its request on the worker, which frees
its KV. While a stream has deltas queued, BACKLOG says how many (counting its end when that came too),
so that the HTTP side can write a client that fell behind all of its pending events at once, and a
stream's last events with its ending.

The per-step fast path: a stream whose request installed a SINK (a streamed response with one
choice, whose events need nothing but the text) and whose task is waiting for its next delta gets a
step's deltas, all but the finish, written by the reader itself through the sink, without waking the
task. The task wakes for what needs it: the stream's end, an error, the finish, or a client the sink
refused because its socket is backed up (the task then writes and waits for the client as before,
so back-pressure and MAX_BEHIND hold). When it wakes, it first takes one `delivered` delta with the
tokens the sink wrote meanwhile: the layers above count them (tokens sent, for a resume elsewhere;
usage) and send nothing for it.

A session that fails (the worker died, the connection broke) ends each of its open streams as that
worker's failure would (WorkerFailed: the pipeline resumes them elsewhere); the next request opens a
new session. So does a certificate rotation: new requests go to a session on the new channel while
the old session finishes its streams and closes.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.router.errors import RouterError

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BEHIND = 2048  # deltas received for one request that its client has not taken yet

# Deltas of the current request's stream received and not yet taken (in the request's task), plus one
# when the stream's clean end has arrived as well: what follows comes without waiting.
BACKLOG: contextvars.ContextVar[int] = contextvars.ContextVar("triphase_backlog", default=0)

# Writes the text of one delta of the current request to its client now, as its next event; False: it
# cannot (the client is behind, gone, or not yet sent the response's start): the request's task gets
# the delta instead.
Sink = Callable[[str], bool]
SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("triphase_sink", default=None)


class SlowReader(RouterError):
    """The client read its stream so slowly that MAX_BEHIND deltas piled up: its request was ended."""

    status = 408
    type = "invalid_request_error"

    def __init__(self) -> None:
        super().__init__(f"the client fell {MAX_BEHIND} tokens behind its stream; the request was ended",
                         code="client_too_slow")


class _Stream:
    __slots__ = ("ended", "error", "items", "pushed", "sink", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[pb.TokenDelta] = collections.deque()
        self.ended = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.sink: Sink | None = None  # armed once the task took the stream's first delta
        self.pushed: list[int] = []  # tokens the sink wrote that the task has not been told of

    def idle(self) -> bool:
        """The task waits for the next delta with nothing queued: everything before was written."""
        return not self.items and self.waiter is not None and not self.waiter.done()

    def finish(self, error: BaseException | None) -> None:
        self.ended = True
        self.error = error
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class WorkerSession(Generic[T]):
    """`stub`: the worker's WorkerService stub (its channel); `convert`: a TokenDelta as the streams
    yield it; `delivered`: the tokens a sink wrote, as the streams yield them; `failure`: the exception
    a stream that ended with a StreamError raises (worker_client.py maps all three)."""

    def __init__(self, stub: Any, convert: Callable[[pb.TokenDelta], T], delivered: Callable[[list[int]], T],
                 failure: Callable[[pb.StreamError], Exception], *, timeout_s: float) -> None:
        self.stub = stub
        self.convert = convert
        self.delivered = delivered
        self.failure = failure
        self.timeout_s = timeout_s
        self.streams: dict[int, _Stream] = {}
        self.closed: Exception | None = None  # why the session ended; None while it serves
        self.retiring = False  # a newer session took over: close once the last stream ends
        self._ids = itertools.count(1)
        self._outbox: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()
        self._call = stub.Session()
        self._reader = asyncio.create_task(self._read())
        self._writer = asyncio.create_task(self._write())

    async def deltas(self, kind: str, request: Any) -> AsyncGenerator[T, None]:
        """Submit `request` (`kind`: "generate" or "decode") and yield its deltas; raises what the stream
        ended with. Closing the generator early cancels the request on the worker."""
        if self.closed is not None:
            raise self.closed
        stream_id = next(self._ids)
        stream = self.streams[stream_id] = _Stream()
        self._outbox.put_nowait(pb.StreamRequest(stream_id=stream_id, **{kind: request}))
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.timeout_s, self._expire, stream_id)
        items, convert, sink = stream.items, self.convert, SINK.get()
        try:
            while True:
                if stream.pushed:
                    pushed, stream.pushed = stream.pushed, []
                    BACKLOG.set(len(items))
                    yield self.delivered(pushed)
                elif items:
                    BACKLOG.set(len(items) - 1 + (stream.ended and stream.error is None))
                    yield convert(items.popleft())
                    stream.sink = sink  # the first delta went the whole way: the next may go straight
                elif stream.ended:
                    if stream.error is not None:
                        raise stream.error
                    return
                else:
                    stream.waiter = loop.create_future()
                    await stream.waiter
        finally:
            BACKLOG.set(0)
            deadline.cancel()
            if self.streams.pop(stream_id, None) is not None:  # still open on the worker
                self._cancel(stream_id)
            self._retire_if_idle()

    def retire(self) -> None:
        self.retiring = True
        self._retire_if_idle()

    async def close(self) -> None:
        self._end(RuntimeError("the router closed the session"))
        self._call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _cancel(self, stream_id: int) -> None:
        if self.closed is None:
            self._outbox.put_nowait(pb.StreamRequest(stream_id=stream_id, cancel=pb.Cancel()))

    def _expire(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._cancel(stream_id)
            stream.finish(self.failure(pb.StreamError(
                code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
                message=f"no end within {self.timeout_s:g} s")))

    def _retire_if_idle(self) -> None:
        if self.retiring and not self.streams and self.closed is None:
            self._end(RuntimeError("a newer session took over"))
            self._call.cancel()

    def _end(self, failure: Exception) -> None:
        if self.closed is None:
            self.closed = failure
        for stream in self.streams.values():
            stream.finish(failure)
        self.streams.clear()

    async def _write(self) -> None:
        """Everything queued goes in one message: requests that arrive while a write is on its way
        (a burst) share the next one."""
        outbox = self._outbox
        try:
            while True:
                requests = [await outbox.get()]
                while not outbox.empty():
                    requests.append(outbox.get_nowait())
                await self._call.write(pb.SessionRequest(requests=requests))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass  # the call ended: the reader reports why

    async def _read(self) -> None:
        streams = self.streams
        try:
            async for batch in self._call:
                for event in batch.events:
                    stream = streams.get(event.stream_id)
                    if stream is None:  # cancelled or expired here while its output was on the way
                        continue
                    deltas = event.deltas
                    if stream.sink is not None and not event.done and stream.idle():
                        written = _push(stream, deltas)
                        if written == len(deltas):
                            continue
                        deltas = deltas[written:]
                    stream.items.extend(deltas)
                    if event.done:
                        del streams[event.stream_id]
                        stream.finish(self.failure(event.error) if event.HasField("error") else None)
                    elif len(stream.items) > MAX_BEHIND:
                        del streams[event.stream_id]
                        self._cancel(event.stream_id)
                        stream.items.clear()
                        stream.finish(SlowReader())
                    else:
                        stream.wake()
            failure = self.failure(pb.StreamError(code=grpc.StatusCode.UNAVAILABLE.value[0],
                                                  message="the worker ended the session"))
        except grpc.aio.AioRpcError as exc:
            failure = self.failure(pb.StreamError(code=exc.code().value[0], message=exc.details() or ""))
        self._end(failure)
        self._writer.cancel()  # nothing more will be sent on this call


def _push(stream: _Stream, deltas: Sequence[pb.TokenDelta]) -> int:
    """How many of `deltas`, from the first, the stream's sink wrote: all but the finish, until it refuses
    one. (A sink serves only requests whose deltas carry nothing else its events show: one choice, no
    logprobs.)"""
    sink, pushed = stream.sink, stream.pushed
    assert sink is not None
    for i, d in enumerate(deltas):
        if d.finish_reason or not sink(d.text):
            return i
        pushed.extend(d.token_ids)
    return len(deltas)
