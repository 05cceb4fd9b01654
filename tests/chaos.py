"""Chaos on the local stack, shared by the suite's short run (tests/e2e/test_chaos.py) and the long
one (benchmarks/chaos.py): a bounded load of greedy chat completions from the official `openai`
client, while processes of a `triphase up` stack are SIGKILLed and `triphase up` restarts them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import threading
import time
import urllib.request
from collections.abc import Callable

import grpc
import openai
import psutil

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.security import mtls

PROMPTS = ["What is the capital of France?", "Name three colors.", "Why do cats purr?", "What is 2 + 2?",
           "Give me a name for a turtle.", "What is rain made of?", "Say hello in Spanish.", "Why is ice cold?"]


@dataclasses.dataclass
class Outcome:
    index: int  # into the prompts
    text: str | None  # None: failed
    error: str = ""
    request_id: str = ""  # the response's id: the router logs each resume and hand-off failure under it


async def load(url: str, requests: int, concurrency: int, max_tokens: int, *, stream_every: int = 2,
               timeout_s: float = 120.0, progress: Callable[[int], None] | None = None,
               prompts: list[str] = PROMPTS) -> list[Outcome]:
    """`requests` greedy chat completions, `concurrency` at a time (every `stream_every`-th streamed),
    `prompts` in rotation. No client retries: a failure is counted, not hidden."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout_s)
    model = (await client.models.list()).data[0].id
    queue = iter(range(requests))
    outcomes: list[Outcome] = []

    async def one(i: int) -> Outcome:
        index = i % len(prompts)
        request = dict(model=model, messages=[{"role": "user", "content": prompts[index]}], max_tokens=max_tokens,
                       temperature=0)
        try:
            if i % stream_every == 0:
                chunks = [c async for c in await client.chat.completions.create(**request, stream=True)]
                pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
                return Outcome(index, "".join(pieces), request_id=chunks[0].id if chunks else "")
            reply = await client.chat.completions.create(**request)
            return Outcome(index, reply.choices[0].message.content or "", request_id=reply.id)
        except (openai.APIError, OSError) as exc:
            return Outcome(index, None, f"{type(exc).__name__}: {exc}")

    async def lane() -> None:
        for i in queue:
            outcomes.append(await one(i))
            if progress is not None:
                progress(len(outcomes))

    try:
        await asyncio.gather(*(lane() for _ in range(concurrency)))
    finally:
        await client.close()
    return outcomes


def children(up_pid: int) -> dict[str, psutil.Process]:
    """The stack's processes by role: "prefill", "decode" (lists as name-i) and "router"."""
    found: dict[str, psutil.Process] = {}
    for proc in psutil.Process(up_pid).children():
        with_args = proc.cmdline()
        if "router" in with_args:
            found["router"] = proc
        elif "--role" in with_args:
            role = with_args[with_args.index("--role") + 1]
            found[f"{role}-{sum(k.startswith(role) for k in found)}"] = proc
    return found


class Killer(threading.Thread):
    """SIGKILLs the stack's workers in turn (prefill-0, decode-0, prefill-0, decode-1, ...) every
    `interval_s` seconds until stopped; `kills` lists (seconds since start, victim)."""

    def __init__(self, up_pid: int, interval_s: float, victims: list[str]) -> None:
        super().__init__(daemon=True)
        self.up_pid = up_pid
        self.interval_s = interval_s
        self.victims = victims
        self.kills: list[tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        turn = 0
        while not self.done.wait(self.interval_s):  # the fault schedule, not synchronisation
            victim = self.victims[turn % len(self.victims)]
            proc = children(self.up_pid).get(victim)
            if proc is not None:
                proc.send_signal(signal.SIGKILL)
                self.kills.append((round(time.monotonic() - started, 1), victim))
            turn += 1

    def stop(self) -> None:
        self.done.set()
        self.join()


def worker_endpoints(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
        return [w["endpoint"] for w in json.load(response)["workers"]]


def all_idle(url: str, bundle: mtls.Bundle | None) -> bool:
    """Every worker is reachable, holds no KV blocks, pins nothing and runs nothing (asked with `bundle`,
    the stack's control identity: `up_bundle`)."""
    for endpoint in worker_endpoints(url):
        try:
            with mtls.sync_channel(endpoint, bundle) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                s = next(iter(stub.WatchStats(pb.WatchStatsRequest(), timeout=5)))
        except grpc.RpcError:
            return False
        if s.free_kv_blocks != s.total_kv_blocks or s.pinned_requests or s.running_requests:
            return False
    return True


def rss_mib(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss) / (1 << 20)
