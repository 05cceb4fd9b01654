"""What the HTTP front costs per streamed request: aiohttp (the router's today) against granian (a Rust
HTTP server from PyPI, embedded in the same asyncio loop through its RSGI interface), and against aiohttp
with each step's events written to every client's socket from one place, serving the same SSE stream.

One server process per front; its app parses the JSON body, then writes one SSE event per "engine
step" (a loop-wide tick every `--step-ms`, as the router's worker session delivers a step's tokens to
every stream at once) and `data: [DONE]`. In the first two, each stream's task wakes per step and
writes its event, as the router's requests do now; in the third, the tick writes every stream's event
itself and a stream's task only waits for its end. A client process keeps `--concurrency` streams open
until `--requests` have ended. Reported: the server process's CPU seconds per request (user + system,
its Rust threads included) and the ratio to aiohttp, same run. What the router does per token besides
this (placement, protobuf, detokenizing, JSON) is the same under all three, so the table says which
change can move the share of the router's CPU that is the front (issue 28 §4).

    python benchmarks/http_front.py [--requests 640] [--concurrency 64] [--tokens 64] [--step-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pathlib
import socket
import sys
import time

from report import log, update_section

FRAME = b'data: {"id":"cmpl-x","object":"text_completion","created":0,"model":"m","choices":[{"index":0,' \
        b'"text":" token","logprobs":null,"finish_reason":null}]}\n\n'
DONE = b"data: [DONE]\n\n"


class Steps:
    """A loop-wide step: every stream waits for the next one, as they wait on their worker's batch."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.next: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if self.next is None or self.next.done():
            self.next = asyncio.get_running_loop().create_future()
        await self.next

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)  # the engine's step time, simulated
            if self.next is not None and not self.next.done():
                self.next.set_result(None)


async def frames(body: bytes, steps: Steps):
    tokens = int(json.loads(body)["max_tokens"])
    for _ in range(tokens):
        await steps.wait()
        yield FRAME
    yield DONE


async def serve_forever(port: int, completions, ready) -> None:
    """aiohttp serving `completions` at /v1/completions on 127.0.0.1:`port`; `ready` set once it listens."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ready.set()
    await asyncio.Event().wait()


def serve_aiohttp(port: int, step_s: float, ready) -> None:
    from aiohttp import web

    async def main() -> None:
        steps = Steps(step_s)
        ticker = asyncio.create_task(steps.run())

        async def completions(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for frame in frames(await request.read(), steps):
                await response.write(frame)
            await response.write_eof()
            return response

        await serve_forever(port, completions, ready)
        ticker.cancel()

    asyncio.run(main())


def serve_aiohttp_per_step(port: int, step_s: float, ready) -> None:
    """aiohttp, but no task per stream wakes per event: each step's events are written to every client's
    socket from the one place that has the step (as the worker session's reader could), chunk-framed by
    hand; a stream's handler only waits for its end."""
    from aiohttp import web

    chunk = f"{len(FRAME):x}\r\n".encode() + FRAME + b"\r\n"
    done = f"{len(DONE):x}\r\n".encode() + DONE + b"\r\n"
    streams: dict[object, list] = {}  # transport -> [events left, the handler's future]

    async def tick() -> None:
        while True:
            await asyncio.sleep(step_s)  # the engine's step time, simulated
            for transport, entry in list(streams.items()):
                entry[0] -= 1
                transport.write(chunk if entry[0] else chunk + done)
                if not entry[0]:
                    del streams[transport]
                    entry[1].set_result(None)

    async def main() -> None:
        ticker = asyncio.create_task(tick())

        async def completions(request: web.Request) -> web.StreamResponse:
            tokens = int(json.loads(await request.read())["max_tokens"])
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            ended = asyncio.get_running_loop().create_future()
            streams[request.transport] = [tokens, ended]
            await ended
            await response.write_eof()
            return response

        await serve_forever(port, completions, ready)
        ticker.cancel()

    asyncio.run(main())


def serve_granian(port: int, step_s: float, ready) -> None:
    from granian.constants import Interfaces
    from granian.server.embed import Server

    async def main() -> None:
        steps = Steps(step_s)
        ticker = asyncio.create_task(steps.run())

        async def app(scope, proto) -> None:
            body = await proto()
            transport = proto.response_stream(status=200, headers=[("content-type", "text/event-stream")])
            async for frame in frames(body, steps):
                await transport.send_bytes(frame)

        server = Server(app, address="127.0.0.1", port=port, interface=Interfaces.RSGI, log_enabled=False)
        ready.set()
        await server.serve()
        ticker.cancel()

    asyncio.run(main())


FRONTS = {"aiohttp": serve_aiohttp, "granian": serve_granian, "aiohttp, written per step": serve_aiohttp_per_step}


async def load(port: int, requests: int, concurrency: int, tokens: int) -> int:
    import aiohttp

    body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": tokens, "stream": True})
    left = requests
    events = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal left, events
        while left > 0:
            left -= 1
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                response.raise_for_status()
                async for line in response.content:
                    if line.startswith(b"data: "):
                        events += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.wait_for(asyncio.gather(*(client(session) for _ in range(concurrency))), 600)
    return events


def cpu_of(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(front: str, args: argparse.Namespace) -> float:
    ready = multiprocessing.Event()
    port = free_port()
    target = FRONTS[front]
    server = multiprocessing.Process(target=target, args=(port, args.step_ms / 1000, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"{front} did not start")
        deadline = time.monotonic() + 30
        while True:  # listening (granian binds after `ready`)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling for the port, with a deadline
        asyncio.run(load(port, args.concurrency, args.concurrency, args.tokens))  # warm-up
        before = cpu_of(server.pid)
        events = asyncio.run(load(port, args.requests, args.concurrency, args.tokens))
        used = cpu_of(server.pid) - before
        if events != args.requests * (args.tokens + 1):
            raise RuntimeError(f"{front}: {events} events, expected {args.requests * (args.tokens + 1)}")
        return used / args.requests
    finally:
        server.kill()
        server.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="each front measured this many times, alternating")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[float]] = {front: [] for front in FRONTS}
    for _ in range(args.rounds):
        for front in results:
            results[front].append(measure(front, args))
            log(f"{front}: {results[front][-1] * 1000:.3f} ms CPU per request")
    base = min(results["aiohttp"])
    lines = [
        "## The HTTP front: aiohttp, granian, and writing per step (issue 28 §4)", "",
        f"`python benchmarks/http_front.py` — one run, 2 cores. {args.requests} streamed requests of {args.tokens} "
        f"SSE events, {args.concurrency} at a time, one event per stream every {args.step_ms:g} ms step; the "
        "server's CPU per request (best of "
        f"{args.rounds} alternating rounds; its Rust threads included).", "",
        "| HTTP front | server CPU / request | all rounds | vs aiohttp |", "|---|---:|---|---:|"]
    for front, values in results.items():
        best = min(values)
        rounds = " / ".join(f"{v * 1000:.2f}" for v in values)
        lines.append(f"| {front} | {best * 1000:.2f} ms | {rounds} ms | {best / base:.2f}x |")
    body = "\n".join(lines)
    sys.stdout.write(body + "\n")
    if not args.no_write:
        update_section("http-front", body)
        log("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
