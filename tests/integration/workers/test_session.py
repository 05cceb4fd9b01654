"""Contract v2 against a real `triphase worker --engine sim`: the router's streams on one Session, sent
as one message per engine step; the same tokens as Generate; per-stream errors and cancellation; a
request that does not parse; and the router's side cutting a reader that falls behind while the
other streams of the worker go on."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.local.processes import start_triphase, stop
from triphase.router import worker_session
from triphase.router.worker_client import Sampling, WorkerClient, WorkerFailed

pytestmark = pytest.mark.slow
PROMPTS = [[1, 2, 3, 4 + i] for i in range(8)]


def generate(request_id: str, prompt: list[int], max_tokens: int = 12, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True, **sampling))


async def session(endpoint: str, requests: list[pb.StreamRequest], *, cancel_after_first: int | None = None,
                  ) -> tuple[list[pb.SessionBatch], dict[int, list[pb.TokenDelta]], dict[int, pb.StreamEvent]]:
    """Submit `requests` on one Session (one message for the first half, one each for the rest) and read
    until each stream has ended."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Session()
        half = len(requests) // 2
        await call.write(pb.SessionRequest(requests=requests[:half]))
        for request in requests[half:]:
            await call.write(pb.SessionRequest(requests=[request]))
        open_ids = {r.stream_id for r in requests if r.WhichOneof("kind") != "cancel"}
        batches, deltas, ends = [], {}, {}
        async with asyncio.timeout(30):
            while open_ids:
                batch = await call.read()
                batches.append(batch)
                for event in batch.events:
                    deltas.setdefault(event.stream_id, []).extend(event.deltas)
                    if event.done:
                        ends[event.stream_id] = event
                        open_ids.discard(event.stream_id)
                    if event.stream_id == cancel_after_first:
                        await call.write(pb.SessionRequest(requests=[pb.StreamRequest(stream_id=cancel_after_first,
                                                                                      cancel=pb.Cancel())]))
                        open_ids.discard(cancel_after_first)
                        cancel_after_first = None
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return batches, deltas, ends


async def stats(endpoint: str) -> pb.WorkerStats:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).WatchStats(pb.WatchStatsRequest(interval_seconds=0.1))
        async for s in call:
            return s
    raise AssertionError("no stats")


async def until_idle(endpoint: str) -> pb.WorkerStats:
    async with asyncio.timeout(10):
        while True:
            s = await stats(endpoint)
            if s.running_requests == 0 and s.free_kv_blocks == s.total_kv_blocks:
                return s
            await asyncio.sleep(0.05)


def test_a_session_streams_what_generate_does_in_one_message_per_step(sim_endpoint):
    async def scenario():
        expected = []
        async with grpc.aio.insecure_channel(sim_endpoint) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            for i, prompt in enumerate(PROMPTS):
                expected.append([d async for d in stub.Generate(generate(f"g{i}", prompt))])
        requests = [pb.StreamRequest(stream_id=i + 1, generate=generate(f"s{i}", p)) for i, p in enumerate(PROMPTS)]
        return expected, await session(sim_endpoint, requests)

    expected, (batches, deltas, ends) = asyncio.run(scenario())
    for i, want in enumerate(expected):
        assert [list(d.token_ids) for d in deltas[i + 1]] == [list(d.token_ids) for d in want]
        assert [d.text for d in deltas[i + 1]] == [d.text for d in want]
        assert ends[i + 1].deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH and not ends[i + 1].HasField("error")
    total = sum(len(d) for d in deltas.values())
    assert total == 8 * 12 and len(batches) <= total / 4, f"{len(batches)} messages for {total} deltas"


def test_a_failing_stream_ends_alone_and_a_cancelled_one_frees_its_kv(sim_endpoint):
    requests = [
        pb.StreamRequest(stream_id=1, generate=generate("long", PROMPTS[0], max_tokens=400)),
        pb.StreamRequest(stream_id=2, generate=generate("bad", PROMPTS[1], max_tokens=4)),
        pb.StreamRequest(stream_id=3, generate=generate("ok", PROMPTS[2])),
        pb.StreamRequest(stream_id=4, decode=pb.DecodeRequest(request_id="no-kv", prompt_token_ids=PROMPTS[4])),
        pb.StreamRequest(stream_id=5),
    ]
    requests[1].generate.sampling.temperature = -1

    async def scenario():
        result = await session(sim_endpoint, requests, cancel_after_first=1)
        return result, await until_idle(sim_endpoint)

    (_, deltas, ends), idle = asyncio.run(scenario())
    assert ends[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert ends[4].HasField("error") and ends[4].error.code != grpc.StatusCode.OK.value[0]
    assert ends[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert sum(len(d.token_ids) for d in deltas[3]) == 12 and not ends[3].HasField("error")
    assert 1 not in ends and idle.running_requests == 0


def test_a_session_request_that_does_not_parse_is_an_invalid_argument(sim_endpoint):
    async def scenario():
        async with grpc.aio.insecure_channel(sim_endpoint) as channel:
            call = channel.stream_stream("/triphase.api.v1.WorkerService/Session")()
            await call.write(b"\xff\xff\xff")
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.read()
            return await call.code(), await call.details()

    code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details


def test_a_reader_that_falls_behind_is_cut_and_the_workers_other_streams_go_on(sim_endpoint, monkeypatch):
    monkeypatch.setattr(worker_session, "MAX_BEHIND", 8)

    async def scenario():
        client = WorkerClient()
        greedy = Sampling(max_tokens=200, temperature=0, ignore_eos=True)
        try:
            slow = client.generate(sim_endpoint, "slow", PROMPTS[0], greedy)
            first = await anext(slow)  # then nobody reads it while the other stream runs to its end
            fast = [d async for d in client.generate(sim_endpoint, "fast", PROMPTS[1], Sampling(
                max_tokens=40, temperature=0, ignore_eos=True))]
            with pytest.raises(worker_session.SlowReader):
                async for _ in slow:
                    pass
            return first, fast, await until_idle(sim_endpoint)
        finally:
            await client.close()

    first, fast, idle = asyncio.run(scenario())
    assert first.token_ids and sum(len(d.token_ids) for d in fast) == 40 and fast[-1].finish_reason == "length"
    assert idle.running_requests == 0


def test_streams_of_a_session_fail_over_when_the_worker_is_gone(tmp_path):
    proc, port = start_triphase(tmp_path, "gone", ["worker", "--engine", "sim", "--port", "0",
                                                   "--sim-decode-ms", "5", "--kv-cache-mib", "16"], timeout=120)

    async def scenario():
        client = WorkerClient()
        try:
            stream = client.generate(f"127.0.0.1:{port}", "r", PROMPTS[0], Sampling(max_tokens=2000,
                                                                                   temperature=0, ignore_eos=True))
            await anext(stream)
            proc.kill()
            with pytest.raises(WorkerFailed):
                async for _ in stream:
                    pass
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        stop(proc, grace=5)
