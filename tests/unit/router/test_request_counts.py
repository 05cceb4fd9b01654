"""triphase_requests_total counts every request once, under the status its client saw: whether the
error came before the pipeline ran (a bad body), from the pipeline (no worker: 503) or inside a stream."""

from __future__ import annotations

import asyncio
import re

from aiohttp import test_utils

from triphase.common.models.files import load_tokenizer
from triphase.router.metrics import RouterMetrics
from triphase.router.openai.routes import Api
from triphase.router.pipeline import Budgets, Pipeline
from triphase.router.registry import Registry
from triphase.router.worker_client import WorkerClient


def _counts(page: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for status, value in re.findall(r'^triphase_requests_total\{[^}]*status="([^"]+)"[^}]*\} (\S+)$', page, re.M):
        if float(value):
            counts[status] = counts.get(status, 0) + float(value)
    return counts


def test_each_request_is_counted_once_under_the_status_its_client_saw():
    tokenizer, _ = load_tokenizer(None)

    async def scenario():
        client = WorkerClient()
        metrics = RouterMetrics("m")
        pipeline = Pipeline(Registry(client, []), client, metrics, budgets=Budgets(placement_wait_s=0.05))
        api = Api(pipeline, tokenizer, metrics, model="m", max_model_len=2048)
        async with test_utils.TestClient(test_utils.TestServer(api.app())) as http:
            body = {"model": "m", "prompt": "hello", "max_tokens": 4}
            plain = await http.post("/v1/completions", json=body)  # no worker: 503 from the pipeline
            streamed = await http.post("/v1/completions", json={**body, "stream": True})
            text = await streamed.text()
            bad = await http.post("/v1/completions", data=b"{not json")
            page = await (await http.get("/metrics")).text()
        await client.close()
        return plain.status, streamed.status, text, bad.status, _counts(page)

    plain, streamed, text, bad, counts = asyncio.run(scenario())
    assert (plain, streamed, bad) == (503, 200, 400)
    assert '"error"' in text and text.endswith("data: [DONE]\n\n")
    assert counts == {"503": 2, "400": 1}
