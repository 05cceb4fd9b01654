"""`triphase up --engine sim`: many simulated workers (real scheduling, KV bookkeeping and KV
hand-off; a timing model instead of the model) behind the real router."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import openai
import pytest

from triphase.local.processes import triphase_up, wait_for

pytestmark = pytest.mark.slow


async def concurrently(url, one, count):
    """`one(client, model, i)` for i in range(count), all at once, with the official client."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    try:
        model = (await client.models.list()).data[0].id
        return await asyncio.gather(*(one(client, model, i) for i in range(count)))
    finally:
        await client.close()


@pytest.fixture(scope="module")
def url():
    with triphase_up(["--engine", "sim", "--prefill", "2", "--decode", "3"], timeout=120) as (_, base):
        yield base


def test_sim_stack_serves_concurrent_requests_deterministically(url):
    with urllib.request.urlopen(f"{url}/readyz") as response:
        workers = json.load(response)["workers"]
    assert sorted(w["role"] for w in workers) == ["decode", "decode", "decode", "prefill", "prefill"]

    async def one(client, model, i):
        reply = await client.completions.create(model=model, prompt=f"request {i % 4}", max_tokens=16, temperature=0)
        return reply.choices[0].text, reply.usage.completion_tokens, reply.choices[0].finish_reason

    results = asyncio.run(concurrently(url, one, 24))
    assert all(tokens == 16 and reason == "length" for _, tokens, reason in results)
    for i in range(4):  # same prompt, same simulated continuation, whichever workers served it
        assert len({text for j, (text, _, _) in enumerate(results) if j % 4 == i}) == 1
    with urllib.request.urlopen(f"{url}/metrics") as response:
        metrics = response.read().decode()
    moved = re.search(r'triphase_kv_transfer_bytes_total\{backend="nixl",model="[^"]+"\} (\S+)', metrics)
    assert moved and float(moved.group(1)) > 0


def _requests_by_status(url):
    with urllib.request.urlopen(f"{url}/metrics") as response:
        metrics = response.read().decode()
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("triphase_requests_total{") and (status := re.search(r'status="([^"]+)"', line)):
            counts[status.group(1)] = counts.get(status.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_clients_that_hang_up_are_counted_apart_not_as_server_errors(url):
    """Half of 20 streams are dropped by their clients after a few chunks: they count as 499, never 503."""
    before = _requests_by_status(url)

    async def one(client, model, i):
        stream = await client.completions.create(model=model, prompt=f"abort {i}", max_tokens=120, temperature=0,
                                                 stream=True)
        chunks = 0
        async for _ in stream:
            chunks += 1
            if i % 2 and chunks == 3:
                await stream.close()  # the client hangs up mid-stream
                break
        return chunks

    chunks = asyncio.run(concurrently(url, one, 20))
    assert [c for i, c in enumerate(chunks) if i % 2] == [3] * 10

    def delta(status):
        return _requests_by_status(url).get(status, 0) - before.get(status, 0)

    try:
        wait_for(lambda: delta("499") + delta("ok") == 20, 30, "the router to count all 20 requests")
    except TimeoutError:
        raise AssertionError({s: delta(s) for s in _requests_by_status(url)}) from None
    assert (delta("499"), delta("ok"), delta("503")) == (10, 10, 0)
