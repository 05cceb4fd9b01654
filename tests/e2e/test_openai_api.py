"""`triphase up` as users run it (router + prefill worker + decode worker, real processes on
127.0.0.1), driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.error
import urllib.request

import openai
import psutil
import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.security import mtls
from triphase.local.processes import triphase_up, up_bundle, wait_for
from triphase.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Why do cats purr?", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def stack():
    with triphase_up(["--dtype", "float32"]) as (proc, url):
        yield {"url": url, "proc": proc, "children": psutil.Process(proc.pid).children(recursive=True)}


@pytest.fixture(scope="module")
def model(stack):
    with urllib.request.urlopen(f"{stack['url']}/v1/models") as response:
        return json.load(response)["data"][0]["id"]


@pytest.fixture(scope="module")
def expected(make_engine, loaded_model):
    engine = make_engine()
    tok = loaded_model.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [c.text for c in engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0))]


def client(stack):
    return openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)


def test_chat_non_streaming_matches_the_engine(stack, model, expected):
    for question, text in zip(QUESTIONS, expected, strict=True):
        reply = client(stack).chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0)
        assert reply.choices[0].message.content == text
        assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10


def test_usage_reports_prefix_cache_hits(stack, model):
    messages = [{"role": "system", "content": "You are a careful assistant. " * 12},
                {"role": "user", "content": "Say hi."}]
    first = client(stack).chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    again = client(stack).chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= 64
    assert again.choices[0].message.content == first.choices[0].message.content


def test_chat_streaming_matches_the_engine(stack, model, expected):
    stream = client(stack).chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[0]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_async_concurrent_streams_match_the_engine(stack, model, expected):
    async def one(aclient, question):
        stream = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0,
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(one(aclient, q) for q in QUESTIONS))
        finally:
            await aclient.close()

    assert asyncio.run(main()) == expected


def test_completions_and_the_disaggregated_path_was_used(stack, model):
    reply = client(stack).completions.create(model=model, prompt="The capital of Japan is", max_tokens=5,
                                             temperature=0)
    assert reply.choices[0].text.strip().startswith("Tokyo")
    with urllib.request.urlopen(f"{stack['url']}/metrics") as response:
        metrics = response.read().decode()
    moved = re.search(r'triphase_kv_transfer_bytes_total\{backend="nixl",model="[^"]+"\} (\S+)', metrics)
    assert moved and float(moved.group(1)) > 0
    assert re.search(r'triphase_workers\{model="[^"]+",role="prefill",state="ready"\} 1', metrics)
    # Zeros are series too (the "no ready decode worker" alert compares one with 0).
    assert re.search(r'triphase_workers\{model="[^"]+",role="decode",state="unhealthy"\} 0', metrics)


@pytest.mark.parametrize("body,param", [
    ("{not json", None),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "MODEL", "max_tokens": -5, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "MODEL", "messages": "hi"}, "messages"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "word " * 9000}]}, "messages"),
    ({"model": "MODEL", "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}, "temperature"),
])
def test_bad_requests_get_openai_400s(stack, model, body, param):
    raw = body if isinstance(body, str) else json.dumps(body).replace("MODEL", model)
    request = urllib.request.Request(f"{stack['url']}/v1/chat/completions", data=raw.encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=60)
    assert failure.value.code == 400
    error = json.load(failure.value)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    ok = client(stack).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_cancelled_streams_free_every_block(stack, model):
    """100 concurrent streams, 20 of them dropped by the client midway: afterwards every worker's KV
    blocks are free and nothing is pinned."""

    async def one(aclient, i):
        stream = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Count from {i} upwards."}], max_tokens=12,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        received = 0
        async for _ in stream:
            received += 1
            if i % 5 == 0 and received == 3:
                await stream.close()  # the client goes away mid-stream
                return "cancelled"
        return "done"

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{stack['url']}/v1", api_key="unused", max_retries=0,
                                     timeout=120)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(100)))
        finally:
            await aclient.close()

    outcomes = asyncio.run(main())
    assert outcomes.count("cancelled") == 20 and outcomes.count("done") == 80
    with urllib.request.urlopen(f"{stack['url']}/readyz") as response:
        endpoints = [w["endpoint"] for w in json.load(response)["workers"]]

    def idle(endpoint):
        with mtls.sync_channel(endpoint, up_bundle(stack["proc"])) as channel:
            s = next(iter(worker_pb2_grpc.WorkerServiceStub(channel).WatchStats(pb.WatchStatsRequest(), timeout=5)))
        return s.free_kv_blocks == s.total_kv_blocks and s.running_requests == s.waiting_requests == 0 \
            and s.pinned_requests == 0

    for endpoint in endpoints:
        wait_for(lambda endpoint=endpoint: idle(endpoint), 30, f"{endpoint} to free every block")


def test_sigterm_stops_every_child(stack):
    proc, children = stack["proc"], stack["children"]
    assert len(children) >= 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
