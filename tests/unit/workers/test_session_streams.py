"""The worker's Session (contract v2) around streams whose deltas a test releases step by step: one
batch per step for every stream, per-stream errors, its bounds, and a request that does not parse."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.roles import Role
from triphase.workers.roles import HandedOver, Refused
from triphase.workers.session import MAX_STREAMS, Malformed, Session


class Steps:
    """Stand-in streams: each submission's generator yields one delta whenever `step` is called, like
    an engine whose step produced output for every running request; `fail` ends one with an exception."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[object]] = {}
        self.closed: list[str] = []

    async def open(self, request: pb.StreamRequest):
        rid = request.generate.request_id
        if rid == "bad":
            raise ValueError("temperature must be >= 0")
        queue = self.queues[rid] = asyncio.Queue()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield pb.TokenDelta(token_ids=[item], finish_reason=pb.FINISH_REASON_LENGTH if item == 99 else 0)
                if item == 99:
                    return
        finally:
            self.closed.append(rid)

    def step(self, token: int = 1) -> None:
        for queue in self.queues.values():
            queue.put_nowait(token)


def submit(stream_id: int, request_id: str) -> pb.SessionRequest:
    return pb.SessionRequest(requests=[pb.StreamRequest(stream_id=stream_id,
                                                        generate=pb.GenerateRequest(request_id=request_id))])


async def run(session: Session, script, *, stop_reading_after: int | None = None) -> list[pb.SessionBatch]:
    """Serve `session` while `script(send, batches)` drives it; the batches it sent. With
    `stop_reading_after`, the router side takes no batch after that many until the script returns."""
    requests: asyncio.Queue[object] = asyncio.Queue()

    async def incoming():
        while (item := await requests.get()) is not None:
            yield item

    batches = []
    script_done = asyncio.Event()

    async def serve():
        async for batch in session.run(incoming()):
            batches.append(batch)
            if len(batches) == stop_reading_after:
                await script_done.wait()

    server = asyncio.create_task(serve())
    await script(requests.put_nowait, batches)
    script_done.set()
    requests.put_nowait(None)
    await asyncio.wait_for(server, 5)
    return batches


async def until(condition) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


def test_one_batch_per_step_carries_every_stream_and_each_ending():
    steps = Steps()
    session = Session(steps.open)

    async def script(send, batches):
        for i in range(3):
            send(submit(i, f"r{i}"))
        await until(lambda: len(steps.queues) == 3)
        for sent in (1, 2):
            steps.step()
            await until(lambda: len(batches) == sent)  # noqa: B023
        steps.step(99)

    batches = asyncio.run(run(session, script))
    assert len(batches) == 3
    assert [sorted(e.stream_id for e in b.events) for b in batches] == [[0, 1, 2]] * 3
    assert all(len(e.deltas) == 1 and not e.done for b in batches[:2] for e in b.events)
    assert all(e.done and not e.HasField("error") for e in batches[2].events)


def test_a_stream_that_fails_ends_alone_with_its_status_code():
    steps = Steps()
    session = Session(steps.open)

    async def script(send, batches):
        send(submit(1, "ok"))
        send(submit(2, "bad"))
        send(submit(3, "moved"))
        send(submit(4, "refused"))
        await until(lambda: len(steps.queues) == 3)
        steps.queues["moved"].put_nowait(HandedOver("worker w handed the stream over"))
        steps.queues["refused"].put_nowait(Refused("worker w is prefill", transient=False, role=Role.PREFILL))
        await until(lambda: sum(e.done for b in batches for e in b.events) == 3)
        steps.queues["ok"].put_nowait(99)

    batches = asyncio.run(run(session, script))
    ends = {e.stream_id: e.error for b in batches for e in b.events if e.done}
    assert ends[2].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "temperature" in ends[2].message
    assert ends[3].code == grpc.StatusCode.UNAVAILABLE.value[0] and ends[3].handed_over
    assert ends[4].code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and ends[4].role == pb.ROLE_PREFILL
    assert ends[1].code == 0 and [list(d.token_ids) for b in batches for e in b.events if e.stream_id == 1
                                  for d in e.deltas] == [[99]]


def test_a_cancelled_stream_is_closed_and_sends_nothing_more():
    steps = Steps()
    session = Session(steps.open)

    async def script(send, batches):
        send(submit(7, "long"))
        send(submit(8, "short"))
        await until(lambda: len(steps.queues) == 2)
        send(pb.SessionRequest(requests=[pb.StreamRequest(stream_id=7, cancel=pb.Cancel())]))
        await until(lambda: "long" in steps.closed)
        steps.step(99)

    batches = asyncio.run(run(session, script))
    assert [e.stream_id for b in batches for e in b.events] == [8]


def test_a_stream_the_router_leaves_unread_is_cut_and_the_others_are_not():
    steps = Steps()
    session = Session(steps.open, max_unsent=3)

    async def script(send, batches):
        send(submit(1, "a"))
        send(submit(2, "b"))
        await until(lambda: len(steps.queues) == 2)
        steps.step()
        await until(lambda: batches)
        queue = steps.queues["a"]
        for _ in range(4):  # the router takes no batch now: four deltas of "a" wait
            queue.put_nowait(1)
            await until(queue.empty)
        await until(lambda: "a" in steps.closed)
        steps.queues["b"].put_nowait(99)

    batches = asyncio.run(run(session, script, stop_reading_after=1))
    ends = {e.stream_id: e.error.code for b in batches for e in b.events if e.done}
    assert ends == {1: grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], 2: 0}


def test_streams_beyond_the_bound_are_refused():
    steps = Steps()
    session = Session(steps.open, max_streams=2)

    async def script(send, batches):
        for i in range(3):
            send(submit(i, f"r{i}"))
        await until(lambda: len(steps.queues) == 2 and batches)
        steps.step(99)

    batches = asyncio.run(run(session, script))
    ends = {e.stream_id: e.error.code for b in batches for e in b.events if e.done}
    assert ends == {0: 0, 1: 0, 2: grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}


TOO_MANY = pb.SessionRequest(requests=[pb.StreamRequest(stream_id=i, cancel=pb.Cancel())
                                        for i in range(MAX_STREAMS + 1)])


@pytest.mark.parametrize("bad", [object(), submit(1, "again"), TOO_MANY],
                         ids=["does-not-parse", "stream-id-in-use", "more-requests-than-streams"])
def test_a_request_that_is_not_well_formed_ends_the_session_and_its_streams(bad):
    steps = Steps()
    session = Session(steps.open)

    async def script(send, batches):
        send(submit(1, "open"))
        await until(lambda: steps.queues)
        send(bad)

    with pytest.raises(Malformed):
        asyncio.run(run(session, script))
    assert steps.closed == ["open"]
