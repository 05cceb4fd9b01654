"""Shared by the benchmarks: start triphase workers and routers as processes on 127.0.0.1, and stream
completions from them as a client."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from triphase.common.net import free_port, http_ok, wait_until

__all__ = ["TRIPHASE", "Streamed", "http_ok", "router", "start", "stop_all", "stream_completion", "wait_until",
           "worker"]

TRIPHASE = [sys.executable, "-m", "triphase.cli"]


def start(args: list[str], log_path: pathlib.Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def worker(tmp: pathlib.Path, name: str, args: list[str], env: dict[str, str] | None = None,
           timeout: float = 180) -> tuple[subprocess.Popen[bytes], str]:
    """A `triphase worker`; returns (process, host:port) once it listens."""
    ready = tmp / f"{name}.port"
    proc = start([*TRIPHASE, "worker", "--port", "0", "--ready-file", str(ready), *args], tmp / f"{name}.log", env)
    wait_until(lambda: proc.poll() is None and ready.exists() and ready.read_text(), timeout, f"worker {name}")
    return proc, f"127.0.0.1:{ready.read_text()}"


def router(tmp: pathlib.Path, endpoints: list[str], args: list[str] = (),  # type: ignore[assignment]
           timeout: float = 60) -> tuple[subprocess.Popen[bytes], str]:
    """A `triphase router` over `endpoints`; returns (process, base URL) once it is ready."""
    port = free_port()
    proc = start([*TRIPHASE, "router", "--workers", ",".join(endpoints), "--port", str(port), *args],
                 tmp / "router.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/readyz"), timeout, "the router")
    return proc, url


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclasses.dataclass
class Streamed:
    """One streamed /v1/completions request as the client saw it."""

    ttft: float | None  # seconds to the first chunk carrying text (None: no text came)
    total: float
    chunks: int  # chunks carrying text
    completion_tokens: int | None  # from the usage chunk, when the request asked for one


async def stream_completion(session: Any, url: str, body: dict[str, Any]) -> Streamed:
    """POST a streaming completion with an aiohttp `session` and time it. Only the usage chunk is
    parsed: the load generator shares the cores whose time it measures."""
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    tokens: int | None = None
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            if b'"usage"' in line and (usage := json.loads(line[6:]).get("usage")):
                tokens = usage["completion_tokens"]
            elif b'"text": ""' not in line and b'"text":""' not in line:
                chunks += 1
                first = first if first is not None else time.perf_counter() - start
    return Streamed(first, time.perf_counter() - start, chunks, tokens)
