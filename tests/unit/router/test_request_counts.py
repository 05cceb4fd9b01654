"""triphase_requests_total counts every request once, under the status its client saw: whether the
error came before the pipeline ran (a bad body), from the pipeline (no worker: 503) or inside a stream;
and a stream whose client left before its ending was written ends quietly."""

from __future__ import annotations

import asyncio
import re

from aiohttp import test_utils, web

from triphase.common.models.files import load_tokenizer
from triphase.router.errors import Unavailable
from triphase.router.metrics import RouterMetrics
from triphase.router.openai.routes import Api
from triphase.router.pipeline import Budgets, Pipeline, Trace
from triphase.router.registry import Registry
from triphase.router.worker_client import WorkerClient

BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}


def _counts(page: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for status, value in re.findall(r'^triphase_requests_total\{[^}]*status="([^"]+)"[^}]*\} (\S+)$', page, re.M):
        if float(value):
            counts[status] = counts.get(status, 0) + float(value)
    return counts


async def _without_workers(script, placement_wait_s: float):
    """Run `script(http)` against an API whose pipeline has no worker to place on (a 503 after
    `placement_wait_s`); the request counts on /metrics afterwards."""
    client = WorkerClient()
    metrics = RouterMetrics("m")
    pipeline = Pipeline(Registry(client, []), client, metrics, budgets=Budgets(placement_wait_s=placement_wait_s))
    api = Api(pipeline, load_tokenizer(None)[0], metrics, model="m", max_model_len=2048)
    try:
        async with test_utils.TestClient(test_utils.TestServer(api.app())) as http:
            result = await script(http)
            async with asyncio.timeout(10):  # every request counted (a hung-up one when its handler ends)
                while sum((counts := _counts(await (await http.get("/metrics")).text())).values()) < result[0]:
                    await asyncio.sleep(0.01)
    finally:
        await client.close()
    return result[1], counts


def test_each_request_is_counted_once_under_the_status_its_client_saw():
    async def script(http):
        plain = await http.post("/v1/completions", json=BODY)  # no worker: 503 from the pipeline
        streamed = await http.post("/v1/completions", json={**BODY, "stream": True})
        text = await streamed.text()
        bad = await http.post("/v1/completions", data=b"{not json")
        return 3, (plain.status, streamed.status, text, bad.status)

    (plain, streamed, text, bad), counts = asyncio.run(_without_workers(script, 0.05))
    assert (plain, streamed, bad) == (503, 200, 400)
    assert '"error"' in text and text.endswith("data: [DONE]\n\n")
    assert counts == {"503": 2, "400": 1}


def test_a_stream_whose_client_left_before_its_ending_ends_quietly():
    """The connection closes after the first event and the stream then fails: writing its ending (an
    error event, [DONE]) meets the closing transport before the loss reaches the handler. That is the
    client's leaving, not a server error (it left a traceback in the router's log)."""
    client = WorkerClient()
    metrics = RouterMetrics("m")
    pipeline = Pipeline(Registry(client, []), client, metrics)
    api = Api(pipeline, load_tokenizer(None)[0], metrics, model="m", max_model_len=2048)
    escaped: list[BaseException] = []
    trace = Trace("cmpl-1")

    async def hang_up(request: web.Request) -> web.StreamResponse:
        async def frames():
            yield b"data: {}\n\n"
            assert request.transport is not None
            request.transport.close()  # the connection is closing, its loss not yet delivered (a race)
            raise Unavailable("no decode worker")

        try:
            return await api._sse(request, frames(), trace)
        except BaseException as exc:
            escaped.append(exc)
            raise

    async def scenario():
        app = api.app()
        app.router.add_post("/hang-up", hang_up)
        async with test_utils.TestClient(test_utils.TestServer(app)) as http:
            response = await http.post("/hang-up")
            assert await response.content.readuntil(b"\n\n") == b"data: {}\n\n"
            async with asyncio.timeout(10):
                while not (escaped or trace.client_gone):
                    await asyncio.sleep(0.01)
        await client.close()

    asyncio.run(scenario())
    assert escaped == [] and trace.client_gone
