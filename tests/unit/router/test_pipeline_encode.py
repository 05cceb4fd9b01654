"""The encode stage with a fake worker client: a request's images are spread over the encode workers,
an image a failing encode worker held goes to the next, and without any the prefill worker gets the
bytes; the prefill worker is told where each image's embeddings are, the decode worker its spans."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence

from tests.unit.router.test_pipeline_resume import Registry, Ticket
from triphase.common.images import digest
from triphase.common.roles import Role
from triphase.router.metrics import RouterMetrics
from triphase.router.pipeline import Budgets, Pipeline, Trace
from triphase.router.policy.pairing import WorkerView
from triphase.router.worker_client import Delta, PromptImage, Sampling, WorkerFailed

IMAGES = [PromptImage(2 + 5 * i, 4, digest(bytes([i])), bytes([i])) for i in range(3)]
PROMPT = [1] * 20


@dataclasses.dataclass
class Client:
    failing: set[str] = dataclasses.field(default_factory=set)
    encoded: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    prefilled: list[list[PromptImage]] = dataclasses.field(default_factory=list)
    decoded: list[list[PromptImage]] = dataclasses.field(default_factory=list)

    async def encode(self, endpoint: str, data: bytes) -> tuple[bytes, object, object]:
        self.encoded.append((endpoint, data))
        await asyncio.sleep(0)  # the images of a request are encoded concurrently
        if endpoint in self.failing:
            raise WorkerFailed("UNAVAILABLE: gone")
        return digest(data), f"slot on {endpoint}", f"ticket of {endpoint}"

    async def prefill(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                      images: Sequence[PromptImage] = ()) -> tuple[Ticket, Delta]:
        self.prefilled.append(list(images))
        return Ticket(), Delta([5], "x")

    async def decode(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                     ticket: Ticket, images: Sequence[PromptImage] = ()) -> AsyncGenerator[Delta, None]:
        self.decoded.append(list(images))
        for delta in (Delta([5], "x"), Delta([2], "", "stop")):
            yield delta

    async def release(self, ticket: Ticket) -> None:
        pass


def run(client: Client, encoders: int) -> Trace:
    views = [WorkerView("p", "p:1", Role.PREFILL), WorkerView("d", "d:1", Role.DECODE, free_blocks=10)]
    views += [WorkerView(f"e{i}", f"e{i}:1", Role.ENCODE) for i in range(encoders)]
    pipeline = Pipeline(Registry(views), client, RouterMetrics("m"), budgets=Budgets(placement_wait_s=1))  # type: ignore[arg-type]
    trace = Trace("r")

    async def collect() -> None:
        async for _ in pipeline.run(PROMPT, Sampling(max_tokens=4, temperature=0), trace, IMAGES):
            pass

    asyncio.run(collect())
    return trace


def test_images_are_spread_over_the_encode_workers():
    client = Client()
    trace = run(client, encoders=2)
    assert [endpoint for endpoint, _ in client.encoded] == ["e0:1", "e1:1", "e0:1"]
    assert trace.encoded_on == ["e0:1", "e1:1", "e0:1"]
    sent = client.prefilled[0]
    assert [(i.offset, i.digest, i.data, i.source, i.slot) for i in sent] == \
        [(i.offset, i.digest, i.data, e, f"slot on {e}") for i, e in zip(IMAGES, trace.encoded_on, strict=True)]
    assert [i.span for i in client.decoded[0]] == [i.span for i in IMAGES]


def test_a_failing_encode_worker_passes_its_images_on():
    client = Client(failing={"e0:1"})
    trace = run(client, encoders=2)
    assert trace.encoded_on == ["e1:1", "e1:1", "e1:1"]


def test_without_encode_workers_the_prefill_worker_encodes():
    for client, encoders in ((Client(), 0), (Client(failing={"e0:1"}), 1)):
        trace = run(client, encoders)
        assert trace.encoded_on == ["", "", ""]
        assert [(i.data, i.source) for i in client.prefilled[0]] == [(i.data, "") for i in IMAGES]
