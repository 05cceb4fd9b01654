"""Real `triphase worker` processes on 127.0.0.1, driven over gRPC: generate, prefill on one worker
and decode on another with the KV streamed between them, roles, cancellation and errors."""

from __future__ import annotations

import concurrent.futures
import contextlib
import urllib.request

import grpc
import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.block_hash import prompt_block_hashes
from triphase.local.processes import log_tail, start_triphase, stop, wait_for
from triphase.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
GREEDY = pb.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@contextlib.contextmanager
def worker(tmp_path, role, kv_transfer="nixl"):
    name = f"{role}-{kv_transfer}"
    proc, port = start_triphase(tmp_path, name, [
        "worker", "--role", role, "--port", "0", "--dtype", "float32", "--kv-cache-mib", "64", "--kv-pin-timeout",
        "60", "--kv-transfer", kv_transfer, "--metrics-port", "0"], timeout=120)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        metrics_port = (tmp_path / f"{name}.port.metrics").read_text()
        yield worker_pb2_grpc.WorkerServiceStub(channel), f"127.0.0.1:{metrics_port}"
        channel.close()
    finally:
        stop(proc, grace=30)
    assert proc.returncode == 0, log_tail(tmp_path / f"{name}.log", 40, "\n")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    with worker(tmp, "prefill") as prefill, worker(tmp, "decode") as decode, \
            worker(tmp, "decode", kv_transfer="grpc") as decode_grpc:
        yield {"prefill": prefill, "decode": decode, "decode-grpc": decode_grpc}


@pytest.fixture(scope="module")
def prompt(loaded_model):
    return loaded_model.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the moon."}])


@pytest.fixture(scope="module")
def expected(make_engine, prompt):
    return make_engine().generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]


def stats(stub):
    return next(iter(stub.WatchStats(pb.WatchStatsRequest(interval_seconds=0.2), timeout=5)))


def all_free(stub):
    s = stats(stub)
    return s.free_kv_blocks == s.total_kv_blocks and s.running_requests == 0 and s.pinned_requests == 0


def test_generate_streams_the_engines_tokens(workers, prompt, expected):
    stub, _ = workers["decode"]
    deltas = list(stub.Generate(pb.GenerateRequest(request_id="g1", prompt_token_ids=prompt, sampling=GREEDY)))
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[0].prompt_tokens == len(prompt)
    assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("decoder,backend", [("decode", "nixl"), ("decode-grpc", "grpc")])
def test_prefill_here_decode_there_equals_one_worker(workers, prompt, expected, decoder, backend):
    prefill, _ = workers["prefill"]
    decode, _ = workers[decoder]
    rid = f"d-{backend}"
    response = prefill.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=GREEDY))
    assert response.kv.num_tokens == len(prompt) and response.kv.block_ids
    assert response.kv.nixl_agent_metadata and response.kv.kv_base_address
    assert list(response.first.token_ids) == expected.token_ids[:1]
    assert stats(prefill).pinned_requests == 1
    deltas = list(decode.Decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=GREEDY,
                                                 kv=response.kv)))
    assert deltas[0].kv_backend == backend
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    wait_for(lambda: all_free(prefill), 10, "the prefill worker to free the pinned blocks")
    wait_for(lambda: all_free(decode), 10, "the decode worker to free its blocks")
    metrics = scrape(workers[decoder][1])
    assert metric(metrics, "triphase_kv_received_bytes_total", backend) > 0
    assert metric(metrics, "triphase_kv_nixl_fallbacks_total") == 0
    assert metric(metrics, "triphase_kv_cache_usage_ratio") == 0


def test_kv_in_other_memory_moves_over_the_grpc_stream_never_a_wrong_nixl_read(workers, prompt, expected):
    """A prefill worker on a GPU advertises its KV in VRAM: a decode worker with host KV must not post
    a NIXL READ with descriptors of the wrong kind; it pulls the gRPC stream (staged through host
    memory) and decodes the same tokens."""
    prefill, _ = workers["prefill"]
    decode, metrics_endpoint = workers["decode"]
    before = metric(scrape(metrics_endpoint), "triphase_kv_received_bytes_total", "grpc")
    response = prefill.Prefill(pb.PrefillRequest(request_id="mixed", prompt_token_ids=prompt, sampling=GREEDY))
    assert response.kv.kv_memory == "DRAM" and response.kv.kv_device_id == 0
    response.kv.kv_memory, response.kv.kv_device_id = "VRAM", 0  # as a GPU prefill worker's would say
    deltas = list(decode.Decode(pb.DecodeRequest(request_id="mixed", prompt_token_ids=prompt, sampling=GREEDY,
                                                 kv=response.kv)))
    assert deltas[0].kv_backend == "grpc"
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    metrics = scrape(metrics_endpoint)
    assert metric(metrics, "triphase_kv_received_bytes_total", "grpc") > before
    assert metric(metrics, "triphase_kv_nixl_fallbacks_total") == 0  # not a failed READ: none was tried
    wait_for(lambda: all_free(prefill), 10, "the prefill worker to free the pinned blocks")


def test_workers_report_where_they_compute(workers):
    stub, metrics_endpoint = workers["decode"]
    s = stats(stub)
    assert (s.device, s.dtype) == ("cpu", "float32")
    info = [line for line in scrape(metrics_endpoint).splitlines() if line.startswith("triphase_worker_info{")]
    assert len(info) == 1 and 'device="cpu"' in info[0] and 'dtype="float32"' in info[0] and 'nixl="DRAM"' in info[0]
    assert info[0].endswith(" 1.0")


def scrape(metrics_endpoint):
    with urllib.request.urlopen(f"http://{metrics_endpoint}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text, name, backend=None):
    for line in text.splitlines():
        if line.startswith(name + "{") and (backend is None or f'backend="{backend}"' in line):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported:\n{text}")


def test_cancelled_stream_frees_blocks(workers, prompt):
    stub, _ = workers["decode"]
    long = pb.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(request_id="c1", prompt_token_ids=prompt, sampling=long))
    next(call)
    next(call)
    assert stats(stub).running_requests == 1
    call.cancel()
    wait_for(lambda: all_free(stub), 10, "the cancelled request's blocks to be freed")


def test_errors_are_status_codes(workers, prompt):
    prefill, _ = workers["prefill"]
    decode, _ = workers["decode"]
    with pytest.raises(grpc.RpcError) as err:
        decode.Prefill(pb.PrefillRequest(request_id="x", prompt_token_ids=prompt, sampling=GREEDY))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Generate(pb.GenerateRequest(request_id="y", prompt_token_ids=[1] * 9000, sampling=GREEDY)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # refused on its length, before two million ids are copied
        list(decode.Generate(pb.GenerateRequest(request_id="y2", prompt_token_ids=[1] * 2_000_000,
                                                sampling=GREEDY), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2000000 tokens" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Generate(pb.GenerateRequest(request_id="z", prompt_token_ids=prompt,
                                                sampling=pb.SamplingParams(max_tokens=4, temperature=-1))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(prefill.ReadKv(pb.ReadKvRequest(request_id="nope")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not prefill.ReleaseKv(pb.ReleaseKvRequest(request_id="nope")).released


def test_set_role_at_runtime(workers, prompt):
    stub, _ = workers["decode"]
    changed = stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_PREFILL))
    assert (changed.previous, changed.current) == (pb.ROLE_DECODE, pb.ROLE_PREFILL)
    try:
        response = stub.Prefill(pb.PrefillRequest(request_id="r1", prompt_token_ids=prompt, sampling=GREEDY))
        assert stub.ReleaseKv(pb.ReleaseKvRequest(request_id="r1")).released
        assert response.kv.source_worker == stats(stub).worker_id
        # A call the new role does not allow says which role the worker has now, for the router's view.
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(request_id="r2", prompt_token_ids=prompt, sampling=GREEDY)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("triphase-role", "prefill") in refused.value.trailing_metadata()
    finally:
        stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_DECODE))
    assert stats(stub).role == pb.ROLE_DECODE


def test_set_role_waits_for_in_flight_streams_and_refuses_new_work(workers, prompt, expected):
    stub, _ = workers["decode"]
    long = pb.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(request_id="w1", prompt_token_ids=prompt, sampling=long))
    next(call)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        switch = pool.submit(stub.SetRole, pb.SetRoleRequest(role=pb.ROLE_PREFILL, grace_seconds=60))
        wait_for(lambda: stats(stub).switching, 10, "the worker to report the switch")
        with pytest.raises(grpc.RpcError) as err:  # not admitting while it switches
            list(stub.Generate(pb.GenerateRequest(request_id="w2", prompt_token_ids=prompt, sampling=GREEDY)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not switch.done() and stats(stub).role == pb.ROLE_DECODE  # the stream still runs here
        call.cancel()  # the in-flight stream ends: the switch completes, nothing handed over
        changed = switch.result(timeout=30)
    try:
        assert (changed.previous, changed.current, changed.handed_over) == (pb.ROLE_DECODE, pb.ROLE_PREFILL, 0)
        assert not stats(stub).switching
    finally:
        stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_DECODE))
    wait_for(lambda: all_free(stub), 10, "all blocks free after the switch")


def test_set_role_hands_over_streams_after_the_grace_period(workers, prompt):
    stub, _ = workers["decode"]
    long = pb.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(request_id="h1", prompt_token_ids=prompt, sampling=long))
    next(call)
    changed = stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_PREFILL, grace_seconds=0.1))
    try:
        assert (changed.current, changed.handed_over) == (pb.ROLE_PREFILL, 1)
        with pytest.raises(grpc.RpcError) as err:  # the stream ends so that the router resumes it elsewhere
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "switched to prefill" in err.value.details()
        wait_for(lambda: all_free(stub), 10, "the handed-over request's blocks to be freed")
    finally:
        stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_DECODE))


@pytest.mark.parametrize("decoder,breakage", [("decode", "layout"), ("decode-grpc", "source gone")])
def test_a_failed_hand_off_is_aborted_and_leaks_nothing(workers, prompt, decoder, breakage):
    prefill, _ = workers["prefill"]
    decode, _ = workers[decoder]
    rid = f"broken-{decoder}"
    kv = prefill.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=GREEDY)).kv
    if breakage == "layout":  # e.g. a prefill pool on another dtype during a rolling upgrade
        kv.layout.num_kv_heads += 1
    else:
        kv.source_endpoint = "127.0.0.1:1"
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=GREEDY, kv=kv)))
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert rid in err.value.details()
    wait_for(lambda: all_free(decode), 10, "the decode worker to free the reserved blocks")
    assert prefill.ReleaseKv(pb.ReleaseKvRequest(request_id=rid)).released  # the router's job on ABORTED
    wait_for(lambda: all_free(prefill), 10, "the prefill worker to free the released blocks")


def test_decode_with_a_first_token_outside_the_vocabulary_is_refused_and_the_worker_lives(
        workers, prompt, expected, loaded_model):
    """Reproduction: this Decode used to kill the engine thread (every later request hung)."""
    prefill, _ = workers["prefill"]
    decode, _ = workers["decode"]
    kv = prefill.Prefill(pb.PrefillRequest(request_id="vocab", prompt_token_ids=prompt, sampling=GREEDY)).kv
    kv.first_token_id = loaded_model.tokenizer.vocab_size + 1000
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(pb.DecodeRequest(request_id="vocab", prompt_token_ids=prompt, sampling=GREEDY, kv=kv)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first_token_id" in err.value.details()
    assert prefill.ReleaseKv(pb.ReleaseKvRequest(request_id="vocab")).released
    deltas = decode.Generate(pb.GenerateRequest(request_id="alive", prompt_token_ids=prompt, sampling=GREEDY),
                             timeout=60)
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    wait_for(lambda: all_free(decode) and all_free(prefill), 10, "every block free")


def test_a_denormal_temperature_is_served_greedily(workers, prompt, expected):
    """Reproduction: temperature 1e-40 used to overflow in the sampler and stop the engine for good."""
    stub, _ = workers["decode"]
    tiny = pb.SamplingParams(max_tokens=24, temperature=1e-40, ignore_eos=True)
    for rid in ("tiny-1", "tiny-2"):  # the second one proves the engine is still stepping
        deltas = stub.Generate(pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=tiny), timeout=60)
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids


@pytest.mark.parametrize("request_id, sampling, message", [
    ("", GREEDY, "request_id"),
    ("r" * 300, GREEDY, "request_id"),
    ("nan", pb.SamplingParams(max_tokens=4, temperature=float("nan")), "temperature"),
    ("stops", pb.SamplingParams(max_tokens=4, stop=["a"] * 40_000), "stop strings"),
    ("stop-ids", pb.SamplingParams(max_tokens=4, stop_token_ids=[10**9]), "stop_token_ids"),
])
def test_out_of_range_inputs_are_invalid_arguments(workers, prompt, request_id, sampling, message):
    stub, _ = workers["decode"]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling),
                           timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    wait_for(lambda: all_free(stub), 10, "nothing allocated")


def test_stats_interval_and_grace_are_clamped(workers):
    stub, _ = workers["decode"]
    call = stub.WatchStats(pb.WatchStatsRequest(interval_seconds=-1), timeout=1)
    received = 0
    with pytest.raises(grpc.RpcError) as err:  # served for a second, at a bounded rate
        for _ in call:
            received += 1
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= received <= 40  # at most one per 50 ms (a negative interval used to busy-loop: thousands)
    changed = stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_DECODE, grace_seconds=float("nan")), timeout=10)
    assert changed.current == pb.ROLE_DECODE


def test_a_read_the_source_cannot_vouch_for_never_enters_the_prefix_cache(workers, loaded_model):
    """The prefill worker no longer holds the pin (here: released before the Decode; in chaos: killed
    during the READ). The NIXL READ itself succeeds, but its bytes are not known to be whole: the
    Decode is ABORTED before the import commits, so no later request can hit those blocks."""
    prefill, _ = workers["prefill"]
    decode, _ = workers["decode"]
    prompt = loaded_model.tokenizer.encode("An unvouched KV cache, " * 8)  # no block shared with other tests
    kv = prefill.Prefill(pb.PrefillRequest(request_id="unvouched", prompt_token_ids=prompt, sampling=GREEDY)).kv
    assert prefill.ReleaseKv(pb.ReleaseKvRequest(request_id="unvouched")).released
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(pb.DecodeRequest(request_id="unvouched", prompt_token_ids=prompt, sampling=GREEDY,
                                            kv=kv)))
    assert err.value.code() == grpc.StatusCode.ABORTED and "did not hold" in err.value.details()
    hashes = set(prompt_block_hashes(prompt, 16))
    assert not hashes & set(stats(decode).cached_block_hashes)
    wait_for(lambda: all_free(decode), 10, "the reserved blocks freed")
