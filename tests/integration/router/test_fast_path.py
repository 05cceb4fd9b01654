"""The per-step fast path (worker_session.SINK, routes.Straight) against a real `triphase worker
--engine sim` and the router in this process: a plain stream's steps are written by the worker
session's reader, and the client gets byte for byte the events the request's task writes (chunked
and, for HTTP/1.0, unchunked), also when the fast path and the task take turns; streams whose events
need their task never take it; the session's consumer learns of every token the sink wrote, in order."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading

import pytest

from triphase.router import main as router_main
from triphase.router import worker_session
from triphase.router.openai.routes import Straight
from triphase.router.worker_client import Sampling, WorkerClient

pytestmark = pytest.mark.slow
TOKENS = 24
WRITE = Straight.__call__


class Writes:
    """Straight's answers, counted; `refuse(n)`: True makes it refuse the n-th call (from 1)."""

    def __init__(self, monkeypatch, refuse=lambda n: False) -> None:
        self.accepted = self.refused = 0

        def call(straight: Straight, text: str) -> bool:
            if refuse(self.accepted + self.refused + 1):
                self.refused += 1
                return False
            ok = WRITE(straight, text)
            self.accepted += ok
            self.refused += not ok
            return ok

        monkeypatch.setattr(Straight, "__call__", call)


@pytest.fixture(scope="module")
def router(sim_endpoint):
    """The router, serving from an event loop of its own thread (the tests' clients block); its port."""
    parser = argparse.ArgumentParser()
    router_main.add_arguments(parser)
    args = parser.parse_args(["--workers", sim_endpoint, "--port", "0", "--rebalance-gap", "0"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def started() -> router_main.RunningRouter:
        running = await router_main.start(args)
        async with asyncio.timeout(30):
            while not any(w.available for w in running.registry.snapshot()):
                await running.registry.changed.wait()
                running.registry.changed.clear()
        return running

    running = asyncio.run_coroutine_threadsafe(started(), loop).result()
    try:
        yield running.port
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _stream(port: int, path: str, body: dict, version: str = "1.1") -> list[dict | str]:
    """POST a streamed request over a plain socket; its events (chunk framing checked and taken off)."""
    data = json.dumps({"model": "SmolLM2-135M-Instruct", **body}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rb") as reader:
        sock.sendall(f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += reader.readline()
        assert head.startswith(f"HTTP/{version} 200".encode()), head
        if b"transfer-encoding: chunked" not in head.lower():
            assert version == "1.0", head
            return _events(reader.read())
        body_bytes = b""
        while size := int(reader.readline()[:-2], 16):
            body_bytes += reader.read(size)
            assert reader.read(2) == b"\r\n"
        assert reader.read(2) == b"\r\n"
        return _events(body_bytes)


def _events(body: bytes) -> list[dict | str]:
    """The SSE events, the request's own id and creation time left out."""
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    out: list[dict | str] = []
    for event in body.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), event
        payload = event.removeprefix(b"data: ")
        if payload == b"[DONE]":
            out.append("[DONE]")
            continue
        chunk = json.loads(payload)
        assert re.fullmatch(r"(chatcmpl|cmpl)-\w+", chunk.pop("id")) and chunk.pop("created")
        out.append(chunk)
    return out


CHAT = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me about the sea."}],
                                  "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
                                  "stream_options": {"include_usage": True}})
COMPLETION = ("/v1/completions", {"prompt": "The sea is", "max_tokens": TOKENS, "temperature": 0,
                                  "ignore_eos": True, "stream": True})


@pytest.mark.parametrize(("path", "body"), [CHAT, COMPLETION], ids=["chat", "completion"])
@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_a_plain_stream_goes_out_on_the_fast_path_as_its_task_would_write_it(router, monkeypatch, path, body,
                                                                             version):
    slow = Writes(monkeypatch, refuse=lambda n: True)
    by_task = _stream(router, path, body, version)
    assert slow.accepted == 0
    fast = Writes(monkeypatch)
    straight = _stream(router, path, body, version)
    assert straight == by_task
    texts = [c["choices"][0] for c in by_task if isinstance(c, dict) and c["choices"]]
    assert sum(1 for c in texts if c.get("text") or c.get("delta", {}).get("content")) >= TOKENS - 2
    # every step after the first and before the last one, as the sim worker sends one token per step
    assert fast.accepted >= TOKENS - 4 and fast.refused <= 2


@pytest.mark.parametrize(("path", "body"), [CHAT, COMPLETION], ids=["chat", "completion"])
def test_the_fast_path_and_the_task_taking_turns_keep_the_events_in_order(router, monkeypatch, path, body):
    """The sink refuses every third step (as when the client's socket backs up): that step and the
    ones queued behind it go through the task, and the fast path takes over again once the task waits."""
    Writes(monkeypatch, refuse=lambda n: True)
    by_task = _stream(router, path, body)
    turns = Writes(monkeypatch, refuse=lambda n: n % 3 == 0)
    assert _stream(router, path, body) == by_task
    assert turns.accepted >= TOKENS // 2 and turns.refused >= TOKENS // 4


@pytest.mark.parametrize("extra", [{"logprobs": True, "top_logprobs": 2}, {"n": 2},
                                   {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}],
                         ids=["logprobs", "n", "tools"])
def test_streams_that_need_their_task_do_not_take_the_fast_path(router, monkeypatch, extra):
    writes = Writes(monkeypatch)
    path, body = CHAT
    events = _stream(router, path, {**body, **extra})
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == TOKENS * extra.get("n", 1)
    assert writes.accepted == writes.refused == 0


def test_the_sessions_consumer_is_told_of_every_token_the_sink_wrote_in_order(sim_endpoint):
    """Through the WorkerClient: the sink takes the texts of the steps while the consumer waits; the
    consumer's next delta is a `delivered` one with their tokens, then what the sink refused."""
    async def scenario() -> tuple[list[int], list[int], str, str, int]:
        client = WorkerClient()
        sampling = Sampling(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        try:
            reference = [d async for d in client.generate(sim_endpoint, "ref", [1, 2, 3, 4], sampling)]
            written: list[str] = []
            calls = 0

            def sink(text: str) -> bool:
                nonlocal calls
                calls += 1
                if calls % 4 == 0:
                    return False
                written.append(text)
                return True

            worker_session.SINK.set(sink)
            tokens: list[int] = []
            texts: list[str] = []
            delivered = 0
            async for delta in client.generate(sim_endpoint, "fast", [1, 2, 3, 4], sampling):
                tokens.extend(delta.token_ids)
                if delta.delivered:
                    delivered += 1
                    assert delta.text == "" and delta.finish_reason is None
                    texts.append("".join(written))  # every text written since the consumer last took one
                    written.clear()
                else:
                    texts.append(delta.text)
            return ([t for d in reference for t in d.token_ids], tokens, "".join(d.text for d in reference),
                    "".join(texts), delivered)
        finally:
            await client.close()

    reference, tokens, reference_text, text, delivered = asyncio.run(scenario())
    assert tokens == reference and text == reference_text
    assert delivered >= TOKENS // 4
