"""Real workers over mTLS (common/security/mtls.py): no certificate, no call; each identity calls only its
methods (workers/authz.py); KV moves only for a valid ticket and a decode worker refuses, without
connecting, to read from an endpoint no ticket of its deployment names (workers/signing.py)."""

from __future__ import annotations

import contextlib
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.block_hash import prompt_block_hashes, salted_root
from triphase.common.security import mtls, pki, tickets
from triphase.local.processes import start_triphase, stop_all
from triphase.workers.signing import KV, kv_fields

pytestmark = pytest.mark.slow
PROMPT = list(range(1, 70))
SAMPLING = pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtls")
    bundles = mtls.write_deployment(tmp / "ours", "ours")
    strangers = mtls.write_deployment(tmp / "theirs", "theirs")
    procs, ports = [], {}
    try:
        for role in ("prefill", "decode"):
            proc, port = start_triphase(tmp, role, [
                "worker", "--role", role, "--port", "0", "--engine", "sim", "--kv-cache-mib", "16",
                "--mtls-dir", str(bundles[pki.Identity.WORKER]), "--health-port", "0"])
            procs.append(proc)
            ports[role] = (f"127.0.0.1:{port}", int((tmp / f"{role}.port.health").read_text()))
        yield {"ports": ports, "bundles": {i.value: mtls.Bundle(d) for i, d in bundles.items()},
               "strangers": {i.value: mtls.Bundle(d) for i, d in strangers.items()}}
    finally:
        stop_all(procs, grace=30)


@contextlib.contextmanager
def stub(endpoint, bundle):
    with mtls.sync_channel(endpoint, bundle) as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def call(endpoint, bundle, method, request):
    """The method's first answer, or its status code."""
    with stub(endpoint, bundle) as s:
        try:
            answer = getattr(s, method)(request, timeout=10)
            return next(iter(answer)) if method in STREAMING else answer
        except grpc.RpcError as exc:
            return exc


STREAMING = {"Decode", "Generate", "WatchStats", "ReadKv", "ReadEmbeddings"}


def prefill(stack, request_id):
    with stub(stack["ports"]["prefill"][0], stack["bundles"]["router"]) as s:
        return s.Prefill(pb.PrefillRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=SAMPLING),
                         timeout=30).kv


def test_no_certificate_or_another_deployment_s_gets_no_call_through(stack):
    endpoint = stack["ports"]["prefill"][0]
    for bundle in (None, stack["strangers"]["router"], stack["strangers"]["control"]):
        answer = call(endpoint, bundle, "WatchStats", pb.WatchStatsRequest())
        assert isinstance(answer, grpc.RpcError) and answer.code() == grpc.StatusCode.UNAVAILABLE, bundle
    # probes: health checking alone, in plaintext, on its own port
    with grpc.insecure_channel(f"127.0.0.1:{stack['ports']['prefill'][1]}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


REQUESTS = {
    "Prefill": pb.PrefillRequest(request_id="x", prompt_token_ids=[1, 2], sampling=SAMPLING),
    "Decode": pb.DecodeRequest(request_id="x", prompt_token_ids=[1, 2], sampling=SAMPLING),
    "Generate": pb.GenerateRequest(request_id="x", prompt_token_ids=[1, 2], sampling=SAMPLING),
    "WatchStats": pb.WatchStatsRequest(),
    "SetRole": pb.SetRoleRequest(role=pb.ROLE_PREFILL, grace_seconds=0),  # the role it has
    "Drain": pb.DrainRequest(),
    "ReleaseKv": pb.ReleaseKvRequest(request_id="x"),
    "ReadKv": pb.ReadKvRequest(request_id="x"),
    "HandOver": pb.HandOverRequest(streams=0),
    "Encode": pb.EncodeRequest(data=b"png"),
    "ReadEmbeddings": pb.ReadEmbeddingsRequest(digest=b"d" * 32),
}
ALLOWED = {"router": {"Prefill", "Decode", "Generate", "Encode", "WatchStats", "HandOver", "ReleaseKv"},
           "control": {"WatchStats", "HandOver", "SetRole", "Drain"},
           "worker": {"ReadKv", "ReleaseKv", "ReadEmbeddings"}}


@pytest.mark.parametrize("identity", ["router", "control", "worker"])
def test_each_identity_may_call_only_its_methods(stack, identity):
    endpoint, bundle = stack["ports"]["prefill"][0], stack["bundles"][identity]
    for method, request in REQUESTS.items():
        if method == "Drain" and identity == "control":
            continue  # allowed, and it would take the worker out of service for the tests after this one
        answer = call(endpoint, bundle, method, request)
        denied = isinstance(answer, grpc.RpcError) and answer.code() == grpc.StatusCode.PERMISSION_DENIED \
            and f"{method} is for" in (answer.details() or "")
        assert denied == (method not in ALLOWED[identity]), (identity, method, answer)


def test_kv_is_read_only_with_its_ticket(stack):
    kv = prefill(stack, "ticketed")
    assert kv.ticket.mac and kv.source_endpoint == stack["ports"]["prefill"][0]
    endpoint, worker = kv.source_endpoint, stack["bundles"]["worker"]
    chunks = call(endpoint, worker, "ReadKv", pb.ReadKvRequest(request_id="ticketed", kv=kv))
    assert isinstance(chunks, pb.KvChunk) and chunks.data

    forged = pb.KvTransferParams()
    forged.CopyFrom(kv)
    forged.block_ids[0] += 1  # someone else's blocks
    late = pb.KvTransferParams()
    late.CopyFrom(kv)
    key = worker.ticket_key
    late.ticket.expires_unix_ms = tickets.now_ms() - 1  # a ticket that expired, signed with the real key
    late.ticket.mac = tickets.sign(key, KV, kv_fields(late), late.ticket.expires_unix_ms)
    unsigned = pb.KvTransferParams()
    unsigned.CopyFrom(kv)
    unsigned.ClearField("ticket")
    for bad, why in [(forged, "does not match"), (late, "expired"), (unsigned, "missing")]:
        for method, request in [("ReadKv", pb.ReadKvRequest(request_id="ticketed", kv=bad)),
                                ("ReleaseKv", pb.ReleaseKvRequest(request_id="ticketed", kv=bad))]:
            answer = call(endpoint, worker, method, request)
            assert answer.code() == grpc.StatusCode.PERMISSION_DENIED and why in answer.details(), (method, why)
    other = pb.KvTransferParams()  # a valid ticket over blocks the request does not hold
    other.CopyFrom(kv)
    other.block_ids[0] += 1
    other.ticket.mac = tickets.sign(key, KV, kv_fields(other), other.ticket.expires_unix_ms)
    answer = call(endpoint, worker, "ReadKv", pb.ReadKvRequest(request_id="ticketed", kv=other))
    assert answer.code() == grpc.StatusCode.PERMISSION_DENIED and "other blocks" in answer.details()
    huge = pb.KvTransferParams()  # counts are checked before the ticket's HMAC runs over them
    huge.CopyFrom(kv)
    huge.block_ids.extend(range(1_000_000))
    for method, request in [("ReadKv", pb.ReadKvRequest(request_id="ticketed", kv=huge)),
                            ("ReleaseKv", pb.ReleaseKvRequest(request_id="ticketed", kv=huge))]:
        answer = call(endpoint, worker, method, request)
        assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot hold" in answer.details(), method
    # the pin survived every refused call: the real ticket still releases it
    released = call(endpoint, worker, "ReleaseKv", pb.ReleaseKvRequest(request_id="ticketed", kv=kv))
    assert released.released


def test_a_decode_worker_moves_kv_for_a_ticket_and_refuses_a_stranger_without_connecting(stack):
    decode, router = stack["ports"]["decode"][0], stack["bundles"]["router"]
    kv = prefill(stack, "handoff")
    first = call(decode, router, "Decode", pb.DecodeRequest(request_id="handoff", prompt_token_ids=PROMPT,
                                                            sampling=SAMPLING, kv=kv))
    assert isinstance(first, pb.TokenDelta) and first.kv_backend in ("nixl", "grpc") and first.token_ids

    listener = socket.create_server(("127.0.0.1", 0))  # an endpoint outside the deployment
    listener.setblocking(False)
    try:
        elsewhere = f"127.0.0.1:{listener.getsockname()[1]}"
        kv = prefill(stack, "redirected")
        redirected = pb.KvTransferParams()
        redirected.CopyFrom(kv)
        redirected.source_endpoint = elsewhere
        self_signed = pb.KvTransferParams()  # a ticket signed with another deployment's key
        self_signed.CopyFrom(redirected)
        stranger = stack["strangers"]["worker"].ticket_key
        self_signed.ticket.mac = tickets.sign(stranger, KV, kv_fields(self_signed), self_signed.ticket.expires_unix_ms)
        for bad in (redirected, self_signed):
            answer = call(decode, router, "Decode", pb.DecodeRequest(request_id="redirected", prompt_token_ids=PROMPT,
                                                                     sampling=SAMPLING, kv=bad))
            assert answer.code() == grpc.StatusCode.PERMISSION_DENIED, answer
        oversized = pb.KvTransferParams()
        oversized.CopyFrom(redirected)
        oversized.num_tokens = 10**9
        answer = call(decode, router, "Decode", pb.DecodeRequest(request_id="redirected", prompt_token_ids=PROMPT,
                                                                 sampling=SAMPLING, kv=oversized))
        assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens" in answer.details(), answer
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody came
    finally:
        listener.close()


def test_published_prefix_hashes_are_salted(stack):
    prefill(stack, "hashed")
    stats = call(stack["ports"]["prefill"][0], stack["bundles"]["control"], "WatchStats", pb.WatchStatsRequest())
    published = set(stats.cached_block_hashes)
    salt = stack["bundles"]["worker"].prefix_salt
    assert set(prompt_block_hashes(PROMPT, stats.block_size, root=salted_root(salt))) <= published
    assert not set(prompt_block_hashes(PROMPT, stats.block_size)) & published
