"""Failures lose nothing. The client receives one uninterrupted stream equal to the fault-free one
when its decode worker switches roles mid-stream or is killed with SIGKILL (a structured, seeded,
penalized stream), and a request still completes when its prefill worker is gone or its KV hand-off
fails (the decode worker prefills)."""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request

import grpc
import jsonschema
import openai
import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.local.processes import http_ok, triphase_process, wait_for
from triphase.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
WORKER = ["--dtype", "float32", "--kv-cache-mib", "64"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    with contextlib.ExitStack() as stack:
        workers = {}
        for name, role in [("prefill", "prefill"), ("decode-a", "decode"), ("decode-b", "decode")]:
            workers[name] = stack.enter_context(
                triphase_process(tmp, name, ["worker", "--role", role, "--port", "0", *WORKER]))
        endpoints = ",".join(f"127.0.0.1:{port}" for _, port in workers.values())
        _, port = stack.enter_context(triphase_process(tmp, "router", ["router", "--workers", endpoints,
                                                                        "--port", "0"]))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), 60, "the router to see its workers")
        yield {"url": url, "workers": workers}


def _ready(url):
    return http_ok(f"{url}/readyz")


def running(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        return next(iter(stub.WatchStats(pb.WatchStatsRequest(), timeout=5))).running_requests


def _request(client):
    model = client.models.list().data[0].id
    return dict(model=model, messages=[{"role": "user", "content": "Write a long poem about the sea."}],
                max_tokens=80, temperature=0, extra_body={"ignore_eos": True})


def _metrics(url):
    with urllib.request.urlopen(f"{url}/metrics") as response:
        return response.read().decode()


def _stub(port):
    return worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def test_decode_worker_switching_roles_hands_its_stream_over(stack):
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)
    request = _request(client)
    fault_free = client.chat.completions.create(**request).choices[0].message.content
    pieces = []
    switched = None
    for chunk in client.chat.completions.create(**request, stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        if len(pieces) == 10:
            switched = next(port for name, (_, port) in stack["workers"].items()
                            if name.startswith("decode") and running(port))
            answer = _stub(switched).SetRole(pb.SetRoleRequest(role=pb.ROLE_PREFILL, grace_seconds=0))
            assert answer.handed_over == 1
    try:
        assert "".join(pieces) == fault_free
    finally:
        _stub(switched).SetRole(pb.SetRoleRequest(role=pb.ROLE_DECODE))
    wait_for(lambda: _ready(stack["url"]) and not any(running(port) for _, port in stack["workers"].values()),
             30, "the stack to settle")


def test_n_choices_handed_over_mid_stream_resume_each_on_its_own(stack):
    """Three seeded choices share one decode stream; its worker switches roles mid-stream: each choice
    resumes alone elsewhere (its own seed, its tokens so far) and ends as it would have."""
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)
    request = {**_request(client), "max_tokens": 40, "temperature": 0.9, "seed": 8, "n": 3,
               "presence_penalty": 0.5}
    fault_free = sorted(client.chat.completions.create(**request).choices, key=lambda c: c.index)
    texts = ["", "", ""]
    switched = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        if switched is None and sum(map(len, texts)) > 30:
            switched = next(port for name, (_, port) in stack["workers"].items()
                            if name.startswith("decode") and running(port))
            assert _stub(switched).SetRole(pb.SetRoleRequest(role=pb.ROLE_PREFILL, grace_seconds=0)).handed_over == 1
    try:
        assert switched is not None
        assert texts == [c.message.content for c in fault_free]
    finally:
        _stub(switched).SetRole(pb.SetRoleRequest(role=pb.ROLE_DECODE))
    wait_for(lambda: _ready(stack["url"]) and not any(running(port) for _, port in stack["workers"].values()),
             30, "the stack to settle")


POEM = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30}, "lines": {
    "type": "array", "items": {"type": "string", "minLength": 10, "maxLength": 40}, "minItems": 5, "maxItems": 5}},
    "required": ["title", "lines"], "additionalProperties": False}


def test_decode_worker_killed_mid_stream(stack):
    """The killed stream is sampled (seeded), penalized and constrained by a JSON schema: the worker that
    resumes it continues the grammar, the penalties' counts and the seeded draws where the killed one was."""
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)
    request = {**_request(client), "max_tokens": 200, "temperature": 0.8, "seed": 5, "frequency_penalty": 0.5,
               "response_format": {"type": "json_schema", "json_schema": {"name": "poem", "schema": POEM}},
               "extra_body": {}}
    fault_free = client.chat.completions.create(**request).choices[0].message.content
    wait_for(lambda: sum(running(port) for name, (_, port) in stack["workers"].items()) == 0, 30,
             "the previous request to finish")
    stream = client.chat.completions.create(**request, stream=True)
    pieces = []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        if len(pieces) == 10:
            victim = next(name for name, (_, port) in stack["workers"].items()
                          if name.startswith("decode") and running(port))
            stack["workers"][victim][0].kill()  # SIGKILL, mid-stream
    assert "".join(pieces) == fault_free
    jsonschema.validate(json.loads(fault_free), POEM)
    assert re.search(r'triphase_request_migrations_total\{model="[^"]+"\} [1-9]', _metrics(stack["url"]))


def test_prefill_worker_killed(stack):
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)
    request = _request(client)
    fault_free = client.chat.completions.create(**request).choices[0].message.content
    stack["workers"]["prefill"][0].kill()
    assert client.chat.completions.create(**request).choices[0].message.content == fault_free


@pytest.fixture(scope="module")
def expiring_stack(tmp_path_factory):
    """A prefill worker whose pins expire at once: every hand-off fails after the prefill."""
    tmp = tmp_path_factory.mktemp("expiring")
    with contextlib.ExitStack() as stack:
        workers = {}
        for name, role, transfer in [("prefill", "prefill", "nixl"), ("decode", "decode", "nixl"),
                                     ("decode-grpc", "decode", "grpc")]:
            workers[name] = stack.enter_context(triphase_process(
                tmp, name, ["worker", "--role", role, "--port", "0", "--kv-pin-timeout", "0",
                            "--kv-transfer", transfer, *WORKER]))
        routers = {}
        for decoder in ("decode", "decode-grpc"):
            endpoints = f"127.0.0.1:{workers['prefill'][1]},127.0.0.1:{workers[decoder][1]}"
            _, port = stack.enter_context(triphase_process(tmp, f"router-{decoder}",
                                                           ["router", "--workers", endpoints, "--port", "0"]))
            routers[decoder] = f"http://127.0.0.1:{port}"
            wait_for(lambda url=routers[decoder]: _ready(url), 60, "the router to see its workers")
        yield routers, workers


@pytest.mark.parametrize("decoder", ["decode", "decode-grpc"])
def test_failed_hand_off_falls_back_to_local_prefill(expiring_stack, make_engine, loaded_model, decoder):
    routers, workers = expiring_stack
    client = openai.OpenAI(base_url=f"{routers[decoder]}/v1", api_key="unused", max_retries=0)
    prompt = loaded_model.tokenizer.encode("The three phases of an LLM request are")
    expected = make_engine().generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    completion = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=24,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == expected.text
    for name in ("prefill", decoder):
        port = workers[name][1]
        wait_for(lambda port=port: _all_free(port), 10, f"{name} to hold no blocks")


def _all_free(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = next(iter(worker_pb2_grpc.WorkerServiceStub(channel).WatchStats(pb.WatchStatsRequest(), timeout=5)))
    return s.free_kv_blocks == s.total_kv_blocks and s.pinned_requests == 0 and s.running_requests == 0
