"""The pipeline's resume rule with a fake worker client: a request resumes elsewhere only if it
had not finished. (A worker SIGKILLed between sending its last delta and closing the stream made
the router resume a finished request past its stop token: one chaos output in a thousand.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator

from triphase.common.roles import Role
from triphase.router.metrics import RouterMetrics
from triphase.router.pipeline import Pipeline
from triphase.router.policy.pairing import WorkerView
from triphase.router.worker_client import Delta, Sampling, WorkerFailed

IM_END = 2


class Registry:
    def __init__(self, views: list[WorkerView]) -> None:
        self.views = views
        self.changed = asyncio.Event()
        self.unhealthy: list[str] = []

    def snapshot(self) -> list[WorkerView]:
        return [v for v in self.views if v.endpoint not in self.unhealthy]

    def mark_unhealthy(self, endpoint: str) -> None:
        self.unhealthy.append(endpoint)

    @contextlib.contextmanager
    def streaming(self, endpoint: str) -> Iterator[None]:
        yield

    prefilling = streaming


class Client:
    """`generate` streams the scripted deltas of each endpoint, then fails if told to."""

    def __init__(self, script: dict[str, tuple[list[Delta], bool]]) -> None:
        self.script = script
        self.calls: list[tuple[str, list[int], int]] = []

    async def generate(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                       resumed_output_tokens: int = 0) -> AsyncGenerator[Delta, None]:
        self.calls.append((endpoint, prompt, resumed_output_tokens))
        deltas, fail = self.script[endpoint]
        for delta in deltas:
            yield delta
        if fail:
            raise WorkerFailed("UNAVAILABLE: Stream removed (Socket closed)")


def run(client: Client, prompt: list[int]) -> list[Delta]:
    views = [WorkerView("a", "a:1", Role.DECODE), WorkerView("b", "b:1", Role.DECODE)]
    pipeline = Pipeline(Registry(views), client, RouterMetrics("m"), placement_wait_s=1)  # type: ignore[arg-type]

    async def collect() -> list[Delta]:
        return [d async for d in pipeline.run(prompt, Sampling(max_tokens=8, temperature=0))]

    return asyncio.run(collect())


def test_a_worker_failing_after_its_final_delta_does_not_resume_the_request() -> None:
    done = [Delta([5], "x"), Delta([IM_END], "", "stop")]
    client = Client({"a:1": (done, True), "b:1": (done, True)})
    deltas = run(client, [1, 9])
    assert [t for d in deltas for t in d.token_ids] == [5, IM_END] and deltas[-1].finish_reason == "stop"
    assert len(client.calls) == 1


def test_a_worker_failing_mid_stream_resumes_with_the_tokens_sent() -> None:
    client = Client({"a:1": ([Delta([5], "x")], True), "b:1": ([Delta([6], "y"), Delta([IM_END], "", "stop")], False)})
    deltas = run(client, [1, 9])
    assert [t for d in deltas for t in d.token_ids] == [5, 6, IM_END]
    (_, _, _), (endpoint, prompt, resumed) = client.calls
    assert (endpoint, prompt, resumed) == ("b:1", [1, 9, 5], 1)
