"""A worker's life around its RPCs (simulated engine, real processes): SIGTERM makes it NOT_SERVING for
every service name at once, refuses new work, lets in-flight streams finish, hands over what is left
when the drain time runs out, and exits 0; a dead engine takes health down and ends `monitor`."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.roles import Role
from triphase.local.processes import start_triphase, wait_for
from triphase.workers.engine.async_engine import AsyncEngine
from triphase.workers.engine.core import EngineConfig
from triphase.workers.engine.sim import SimTiming, simulated_engine
from triphase.workers.lifecycle import SERVICES, monitor
from triphase.workers.server import WorkerServicer, serve

pytestmark = pytest.mark.slow
LONG = pb.SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)  # 150 steps of 20 ms: 3 s


@contextlib.contextmanager
def sim_worker(tmp_path, drain_timeout: float):
    proc, port = start_triphase(tmp_path, f"w{drain_timeout}", [
        "worker", "--engine", "sim", "--port", "0", "--sim-decode-ms", "20", "--kv-cache-mib", "16",
        "--drain-timeout", str(drain_timeout)], timeout=60)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield proc, worker_pb2_grpc.WorkerServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def statuses(health) -> set[int]:
    return {health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status for name in SERVICES}


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path):
    with sim_worker(tmp_path, drain_timeout=30) as (proc, stub, health):
        assert statuses(health) == {health_pb2.HealthCheckResponse.SERVING}
        call = stub.Generate(pb.GenerateRequest(request_id="long", prompt_token_ids=[5, 6, 7], sampling=LONG))
        next(call)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: statuses(health) == {health_pb2.HealthCheckResponse.NOT_SERVING}, 10,
                 "NOT_SERVING for every service name")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(request_id="new", prompt_token_ids=[1, 2], sampling=LONG)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        rest = list(call)  # the in-flight stream runs to its end
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and 1 + len(rest) == LONG.max_tokens
        assert proc.wait(timeout=30) == 0


def test_streams_left_when_the_drain_time_ends_are_handed_over(tmp_path):
    with sim_worker(tmp_path, drain_timeout=0.5) as (proc, stub, _):
        call = stub.Generate(pb.GenerateRequest(request_id="long", prompt_token_ids=[5, 6, 7], sampling=LONG))
        next(call)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:  # UNAVAILABLE: the router resumes it elsewhere
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        assert proc.wait(timeout=30) == 0


async def test_a_dead_engine_is_not_serving_and_ends_the_monitor():
    engine = simulated_engine(None, EngineConfig(num_kv_blocks=32), SimTiming(0, 0, 0, 0))

    def broken(plan):
        raise RuntimeError("injected")

    engine.runner.execute = broken
    runner = AsyncEngine(engine, max_step_failures=1)
    runner.start()
    worker = WorkerServicer(runner, worker_id="w", endpoint="", role=Role.BOTH, model="sim")
    server, port = await serve(worker, "127.0.0.1", 0)
    try:
        watchdog = asyncio.ensure_future(monitor(worker, interval_s=0.05))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(pb.GenerateRequest(request_id="x", prompt_token_ids=[1, 2],
                                                                sampling=LONG)):
                    pass
            assert err.value.code() == grpc.StatusCode.INTERNAL and "injected" not in err.value.details()
            assert "engine dead" in await asyncio.wait_for(watchdog, 10)
            health = health_pb2_grpc.HealthStub(channel)
            for name in SERVICES:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.WatchStats(pb.WatchStatsRequest(), timeout=5):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
        await runner.stop()
