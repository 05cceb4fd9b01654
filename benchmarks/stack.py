"""Shared by the benchmarks: triphase workers and routers as processes on 127.0.0.1 (through
triphase.local.processes, as the tests and `triphase up` start them), and streamed completions timed
as a client sees them."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import time
from typing import Any

from triphase.common.profile import Profile
from triphase.local.processes import TRIPHASE, http_ok, spawn, start_triphase, stop_all, wait_until

__all__ = [
    "TRIPHASE",
    "Streamed",
    "http_ok",
    "profile",
    "router",
    "spawn",
    "start_triphase",
    "stop_all",
    "stream_completion",
    "wait_until",
    "worker",
]

def profile(path: pathlib.Path, args: list[str]) -> Profile:
    """Run `triphase profile ARGS -o PATH` (quietly) and load what it wrote."""
    subprocess.run([sys.executable, "-m", "triphase.cli", "profile", *args, "-o", str(path)], check=True,
                   capture_output=True)
    return Profile.load(path)


def worker(tmp: pathlib.Path, name: str, args: list[str], env: dict[str, str] | None = None,
           timeout: float = 180) -> tuple[subprocess.Popen[bytes], str]:
    """A `triphase worker`; returns (process, host:port) once it listens."""
    proc, port = start_triphase(tmp, name, ["worker", "--port", "0", *args], env, timeout)
    return proc, f"127.0.0.1:{port}"


def router(tmp: pathlib.Path, endpoints: list[str], args: list[str] = (),  # type: ignore[assignment]
           timeout: float = 60) -> tuple[subprocess.Popen[bytes], str]:
    """A `triphase router` over `endpoints`; returns (process, base URL) once it is ready."""
    proc, port = start_triphase(tmp, "router", ["router", "--workers", ",".join(endpoints), "--port", "0", *args],
                                timeout=timeout)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/readyz"), timeout, "the router")
    return proc, url


@dataclasses.dataclass
class Streamed:
    """One streamed /v1/completions request as the client saw it."""

    ttft: float | None  # seconds to the first chunk carrying text (None: no text came)
    total: float
    chunks: int  # chunks carrying text
    completion_tokens: int | None  # from the usage chunk, when the request asked for one
    prompt_tokens: int | None = None  # likewise


async def stream_completion(session: Any, url: str, body: dict[str, Any]) -> Streamed:
    """POST a streaming completion with an aiohttp `session` and time it. Only the usage chunk is
    parsed: the load generator shares the cores whose time it measures."""
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    tokens: int | None = None
    prompt: int | None = None
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            if b'"usage"' in line and (usage := json.loads(line[6:]).get("usage")):
                tokens, prompt = usage["completion_tokens"], usage["prompt_tokens"]
            elif b'"text": ""' not in line and b'"text":""' not in line:
                chunks += 1
                first = first if first is not None else time.perf_counter() - start
    return Streamed(first, time.perf_counter() - start, chunks, tokens, prompt)
