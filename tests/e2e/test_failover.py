"""Failures lose nothing: a decode worker killed with SIGKILL mid-stream, and the client still
receives one uninterrupted stream equal to the fault-free one."""

from __future__ import annotations

import contextlib
import re
import urllib.request

import grpc
import openai
import pytest

from tests.procs import triphase_process, wait_for
from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc

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
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def running(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        return next(iter(stub.WatchStats(pb.WatchStatsRequest(), timeout=5))).running_requests


def test_decode_worker_killed_mid_stream(stack):
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    request = dict(model=model, messages=[{"role": "user", "content": "Write a long poem about the sea."}],
                   max_tokens=80, temperature=0, extra_body={"ignore_eos": True})
    fault_free = client.chat.completions.create(**request).choices[0].message.content

    stream = client.chat.completions.create(**request, stream=True)
    pieces = []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        if len(pieces) == 10:
            victim = next(name for name, (_, port) in stack["workers"].items()
                          if name.startswith("decode") and running(port))
            stack["workers"][victim][0].kill()  # SIGKILL, mid-stream
    assert "".join(pieces) == fault_free
    with urllib.request.urlopen(f"{stack['url']}/metrics") as response:
        metrics = response.read().decode()
    assert re.search(r'triphase_request_migrations_total\{model="[^"]+"\} [1-9]', metrics)
