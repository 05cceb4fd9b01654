"""Fuzzing the worker service (hypothesis): malformed bytes and messages with every field drawn from
its whole wire range (NaN and infinite floats, huge counts and ids, any text) against a real worker
(simulated engine, NIXL on). No call may end INTERNAL or UNKNOWN, the worker must stay SERVING and
leak no KV, and its log must hold no traceback. Examples per property: TRIPHASE_FUZZ_EXAMPLES (the
suite runs a short, derandomized pass; docs/reliability.md records a long one)."""

from __future__ import annotations

import os

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.local.processes import triphase_process, wait_for

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("TRIPHASE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="TRIPHASE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
METHODS = {"Prefill": False, "Decode": True, "Generate": True, "WatchStats": True, "SetRole": False,
           "ReleaseKv": False, "ReadKv": True}  # Drain is left out: it cannot be undone


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    args = ["worker", "--engine", "sim", "--port", "0", "--sim-prefill-ms", "0", "--sim-decode-ms", "0",
            "--kv-cache-mib", "16", "--kv-pin-timeout", "1"]
    with triphase_process(tmp, "worker", args) as (proc, port):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        process = psutil.Process(proc.pid)
        yield {"channel": channel, "stub": worker_pb2_grpc.WorkerServiceStub(channel),
               "endpoint": f"127.0.0.1:{port}", "log": tmp / "worker.log", "process": process,
               "rss": process.memory_info().rss}
        channel.close()


def call(channel: grpc.Channel, method: str, request: bytes) -> grpc.StatusCode:
    """Send raw request bytes; read at most 32 streamed answers (1 of WatchStats, which may wait its
    interval, up to 60 s, before the next). The status the call ended with."""
    path = f"/triphase.api.v1.WorkerService/{method}"
    most = 1 if method == "WatchStats" else 32
    try:
        if METHODS[method]:
            stream = channel.unary_stream(path)(request, timeout=10)
            for i, _ in enumerate(stream):
                if i == most - 1:
                    stream.cancel()
                    return grpc.StatusCode.CANCELLED
        else:
            channel.unary_unary(path)(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


u32, i64 = st.integers(0, 2**32 - 1), st.integers(-(2**63), 2**63 - 1)
small_ids = st.lists(st.integers(0, 60_000), min_size=1, max_size=40)
any_ids = st.lists(u32, max_size=40)
floats = st.floats(width=32)
texts = st.text(max_size=300)


@st.composite
def sampling(draw):
    p = pb.SamplingParams(max_tokens=draw(st.one_of(st.integers(0, 40), u32)), temperature=draw(floats),
                          top_p=draw(floats), top_k=draw(st.integers(-(2**31), 2**31 - 1)),
                          stop=draw(st.lists(texts, max_size=20)), stop_token_ids=draw(any_ids),
                          ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        p.seed = draw(i64)
    if draw(st.booleans()):
        p.logprobs = draw(u32)
    return p


@st.composite
def kv_params(draw, endpoint):
    layout = pb.KvLayout(num_layers=draw(st.integers(0, 4)), block_size=draw(st.sampled_from([0, 16, 2**32 - 1])),
                         num_kv_heads=draw(st.integers(0, 4)), head_dim=draw(st.sampled_from([0, 8, 2**31])),
                         dtype=draw(st.sampled_from(["float32", "bfloat16", "int8", ""])), block_bytes=draw(u32))
    return pb.KvTransferParams(
        request_id=draw(texts), source_worker=draw(texts),
        source_endpoint=draw(st.sampled_from([endpoint, "127.0.0.1:1", ""])),
        nixl_agent_metadata=draw(st.binary(max_size=256)), nixl_agent_name=draw(texts),
        kv_base_address=draw(st.integers(0, 2**64 - 1)), block_ids=draw(any_ids), layout=layout,
        num_tokens=draw(u32), first_token_id=draw(u32))


@st.composite
def requests(draw, endpoint):
    method = draw(st.sampled_from(sorted(METHODS)))
    rid = draw(st.one_of(texts, st.just("fuzz")))
    prompt = draw(st.one_of(small_ids, any_ids))
    if method == "Generate":
        msg = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=draw(sampling()),
                                 resumed_output_tokens=draw(u32))
    elif method == "Prefill":
        msg = pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=draw(sampling()))
    elif method == "Decode":
        msg = pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=draw(sampling()),
                               kv=draw(kv_params(endpoint)))
    elif method == "WatchStats":
        msg = pb.WatchStatsRequest(interval_seconds=draw(floats))
    elif method == "SetRole":
        msg = pb.SetRoleRequest(role=draw(st.integers(0, 9)))
        if draw(st.booleans()):
            msg.grace_seconds = draw(st.floats())
    elif method == "ReleaseKv":
        msg = pb.ReleaseKvRequest(request_id=rid)
    else:
        msg = pb.ReadKvRequest(request_id=rid, max_chunk_bytes=draw(u32))
    return method, msg.SerializeToString()


def test_messages_from_the_whole_wire_range(worker):
    @FUZZ
    @given(requests(worker["endpoint"]))
    def check(item):
        method, data = item
        assert call(worker["channel"], method, data) not in BAD, method

    check()


def test_malformed_bytes(worker):
    @FUZZ
    @given(st.sampled_from(sorted(METHODS)), st.binary(max_size=512))
    def check(method, data):
        assert call(worker["channel"], method, data) not in BAD, (method, data)

    check()


def test_the_worker_is_whole_afterwards(worker):
    stub = worker["stub"]
    stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_BOTH, grace_seconds=0), timeout=30)
    health = health_pb2_grpc.HealthStub(worker["channel"])
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING

    def idle():
        s = next(iter(stub.WatchStats(pb.WatchStatsRequest(), timeout=5)))
        return s.free_kv_blocks == s.total_kv_blocks and not s.pinned_requests and not s.running_requests

    wait_for(idle, 30, "every KV block free (pins expire after 1 s)")
    deltas = list(stub.Generate(pb.GenerateRequest(request_id="after", prompt_token_ids=[5, 6, 7],
                                                   sampling=pb.SamplingParams(max_tokens=8)), timeout=30))
    assert sum(len(d.token_ids) for d in deltas) == 8
    assert "Traceback" not in worker["log"].read_text()
    assert worker["process"].memory_info().rss < worker["rss"] * 1.25 + (32 << 20)  # back near its baseline
