"""The router spreads running streams: a crowded decode worker hands streams over to an idle one,
and every stream still completes with the same tokens.

Sim stack, 1 prefill + 2 decode (decode step 20 ms + 10 ms per stream). decode-1 is switched to
prefill, so that 12 long streams all start on decode-0; switched back, it is idle while decode-0
runs 12: the router moves streams until the gap is under its threshold (4), and each completion
equals the one the same prompt got before, when the streams were spread from the start.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import openai
import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.security import mtls
from triphase.local.processes import triphase_up, up_bundle

pytestmark = pytest.mark.slow
SIM = ["--engine", "sim", "--prefill", "1", "--decode", "2", "--sim-decode-ms", "20", "--sim-decode-per-seq-ms", "10"]
STREAMS, TOKENS = 12, 150


async def completions(url: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        model = (await client.models.list()).data[0].id

        async def one(i: int) -> str:
            reply = await client.completions.create(model=model, prompt=f"story {i}", max_tokens=TOKENS,
                                                    temperature=0)
            assert reply.usage is not None and reply.usage.completion_tokens == TOKENS
            return reply.choices[0].text

        return list(await asyncio.gather(*(one(i) for i in range(STREAMS))))
    finally:
        await client.close()


def set_role(endpoint: str, role: int, bundle: mtls.Bundle | None) -> None:
    with mtls.sync_channel(endpoint, bundle) as channel:
        worker_pb2_grpc.WorkerServiceStub(channel).SetRole(pb.SetRoleRequest(role=role, grace_seconds=0), timeout=30)


async def running_on(endpoint: str, at_least: int, timeout_s: float, bundle: mtls.Bundle | None) -> None:
    """Until the worker reports `at_least` running requests (its stats stream; bounded)."""
    channels = mtls.ChannelCache(bundle)
    try:
        stats = worker_pb2_grpc.WorkerServiceStub(channels.get(endpoint)).WatchStats(
            pb.WatchStatsRequest(interval_seconds=0.1))
        async with asyncio.timeout(timeout_s):
            async for s in stats:
                if s.running_requests >= at_least:
                    stats.cancel()
                    return
    finally:
        await channels.close()


def rebalanced(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^triphase_streams_rebalanced_total\{[^}]*\} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_crowded_decode_worker_hands_streams_to_an_idle_one() -> None:
    with triphase_up(SIM, timeout=120) as (proc, url):
        bundle = up_bundle(proc)  # the control identity: it may switch roles
        expected = await completions(url)  # spread over both decode workers from the start
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            decode = sorted(w["endpoint"] for w in json.load(response)["workers"] if w["role"] == "decode")
        before = rebalanced(url)
        await asyncio.to_thread(set_role, decode[1], pb.ROLE_PREFILL, bundle)
        crowded = asyncio.create_task(completions(url))
        await running_on(decode[0], STREAMS, 30, bundle)  # all twelve on decode-0
        await asyncio.to_thread(set_role, decode[1], pb.ROLE_DECODE, bundle)
        assert await asyncio.wait_for(crowded, 120) == expected
        assert rebalanced(url) - before >= 3  # 12/0 -> at least 9/3
