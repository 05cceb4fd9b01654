"""The pipeline's retry rules with a fake worker client: a request resumes elsewhere only if it
had not finished (a worker SIGKILLed between sending its last delta and closing the stream made
the router resume a finished request past its stop token: one chaos output in a thousand); a
failed prefill goes to another prefill worker before the decode worker prefills locally (a prefill
worker switching role hands its whole queue back, which must not stall the decode pool)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncGenerator, Iterator, Sequence

from triphase.common.roles import Role
from triphase.common.sampling import choice_seed
from triphase.router.metrics import RouterMetrics
from triphase.router.pipeline import Attempt, Budgets, Pipeline, Trace
from triphase.router.policy.pairing import WorkerView
from triphase.router.worker_client import (
    Delta,
    HandedOver,
    HandOffFailed,
    PromptImage,
    RoleRefused,
    Sampling,
    WorkerFailed,
)

IM_END = 2


class Registry:
    def __init__(self, views: list[WorkerView]) -> None:
        self.views = views
        self.changed = asyncio.Event()
        self.unhealthy: list[str] = []
        self.roles: dict[str, Role] = {}  # what set_role was told

    def set_role(self, endpoint: str, role: Role) -> None:
        self.roles[endpoint] = role
        self.views = [dataclasses.replace(v, role=role) if v.endpoint == endpoint else v for v in self.views]

    def snapshot(self) -> list[WorkerView]:
        return [v for v in self.views if v.endpoint not in self.unhealthy]

    def mark_unhealthy(self, endpoint: str) -> None:
        self.unhealthy.append(endpoint)

    @contextlib.contextmanager
    def streaming(self, endpoint: str) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def prefilling(self, endpoint: str, tokens: int) -> Iterator[None]:
        yield


class Client:
    """`generate` streams the scripted deltas of each endpoint, then fails if told to."""

    def __init__(self, script: dict[str, tuple[list[Delta], bool]]) -> None:
        self.script = script
        self.calls: list[tuple[str, list[int], int]] = []

    async def generate(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                       resumed_output_tokens: int = 0, images: Sequence[PromptImage] = (),
                       ) -> AsyncGenerator[Delta, None]:
        self.calls.append((endpoint, prompt, resumed_output_tokens))
        deltas, fail = self.script[endpoint]
        for delta in deltas:
            yield delta
        if fail:
            raise WorkerFailed("UNAVAILABLE: Stream removed (Socket closed)")


def run(client: Client, prompt: list[int], trace: Trace | None = None) -> list[Delta]:
    views = [WorkerView("a", "a:1", Role.DECODE), WorkerView("b", "b:1", Role.DECODE)]
    pipeline = Pipeline(Registry(views), client, RouterMetrics("m"), budgets=Budgets(placement_wait_s=1))  # type: ignore[arg-type]

    async def collect() -> list[Delta]:
        return [d async for d in pipeline.run(prompt, Sampling(max_tokens=8, temperature=0), trace)]

    return asyncio.run(collect())


def test_a_worker_failing_after_its_final_delta_does_not_resume_the_request() -> None:
    done = [Delta([5], "x"), Delta([IM_END], "", "stop")]
    client = Client({"a:1": (done, True), "b:1": (done, True)})
    deltas = run(client, [1, 9])
    assert [t for d in deltas for t in d.token_ids] == [5, IM_END] and deltas[-1].finish_reason == "stop"
    assert len(client.calls) == 1


def test_a_worker_failing_mid_stream_resumes_with_the_tokens_sent() -> None:
    client = Client({"a:1": ([Delta([5], "x")], True), "b:1": ([Delta([6], "y"), Delta([IM_END], "", "stop")], False)})
    trace = Trace("r")
    deltas = run(client, [1, 9], trace)
    assert [t for d in deltas for t in d.token_ids] == [5, 6, IM_END]
    (_, _, _), (endpoint, prompt, resumed) = client.calls
    assert (endpoint, prompt, resumed) == ("b:1", [1, 9, 5], 1)
    assert trace.attempts == [Attempt.FRESH, Attempt.MIGRATE]


@dataclasses.dataclass
class Ticket:
    nbytes: int = 0


class PrefillClient(Client):
    """Prefill and decode fail on the endpoints in `refusing`; decode repeats the first token, then
    stops; local prefill (generate) answers 7."""

    def __init__(self, refusing: set[str]) -> None:
        done = ([Delta([7], "z"), Delta([IM_END], "", "stop")], False)
        super().__init__({"d:1": done, "e:1": done})
        self.refusing = refusing
        self.prefills: list[str] = []
        self.decodes: list[str] = []
        self.released = 0

    async def prefill(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                      images: Sequence[PromptImage] = ()) -> tuple[Ticket, Delta]:
        self.prefills.append(endpoint)
        if endpoint in self.refusing:
            raise WorkerFailed("UNAVAILABLE: switching role")
        return Ticket(), Delta([5], "x")

    async def decode(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                     ticket: Ticket, images: Sequence[PromptImage] = ()) -> AsyncGenerator[Delta, None]:
        self.decodes.append(endpoint)
        if endpoint in self.refusing:
            raise WorkerFailed("FAILED_PRECONDITION: worker is prefill, not decode")
        for delta in (Delta([5], "x"), Delta([IM_END], "", "stop")):
            yield delta

    async def release(self, ticket: Ticket) -> None:
        self.released += 1


def prefill_run(client: PrefillClient, second_decoder: bool = False, trace: Trace | None = None) -> list[int]:
    views = [WorkerView("p1", "p1:1", Role.PREFILL, queued_prefill_tokens=0),
             WorkerView("p2", "p2:1", Role.PREFILL, queued_prefill_tokens=100),
             WorkerView("d", "d:1", Role.DECODE, free_blocks=100)]
    if second_decoder:
        views.append(WorkerView("e", "e:1", Role.DECODE, free_blocks=10))
    pipeline = Pipeline(Registry(views), client, RouterMetrics("m"), budgets=Budgets(placement_wait_s=1))  # type: ignore[arg-type]

    async def collect() -> list[int]:
        return [t async for d in pipeline.run([1, 9], Sampling(max_tokens=8, temperature=0), trace)
                for t in d.token_ids]

    return asyncio.run(collect())


def test_a_failed_prefill_goes_to_another_prefill_worker() -> None:
    client = PrefillClient(refusing={"p1:1"})
    assert prefill_run(client) == [5, IM_END]
    assert client.prefills == ["p1:1", "p2:1"] and client.calls == []  # no local prefill on d


def test_the_decode_worker_prefills_only_when_no_prefill_worker_is_left() -> None:
    client = PrefillClient(refusing={"p1:1", "p2:1"})
    trace = Trace("r")
    assert prefill_run(client, trace=trace) == [7, IM_END]
    assert trace.attempts == [Attempt.FRESH] and trace.local_prefill  # within the fresh attempt
    assert client.prefills == ["p1:1", "p2:1"] and [c[0] for c in client.calls] == ["d:1"]


def test_a_decode_worker_refusing_the_hand_off_passes_the_kv_to_another() -> None:
    """d (the roomier decode worker, chosen first) has just become a prefill worker: e takes the
    pinned KV with the same ticket; nothing is prefilled again and nothing is released early."""
    client = PrefillClient(refusing={"d:1"})
    assert prefill_run(client, second_decoder=True) == [5, IM_END]
    assert client.prefills == ["p1:1"] and client.decodes == ["d:1", "e:1"] and client.calls == []
    assert client.released == 0  # e adopted the KV (and releases the prefill worker's copy itself)


class RoleSwitched(PrefillClient):
    """d became a prefill worker before the router's view of it changed: it refuses Decode for its role."""

    async def decode(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                     ticket: Ticket, images: Sequence[PromptImage] = ()) -> AsyncGenerator[Delta, None]:
        self.decodes.append(endpoint)
        if endpoint == "d:1":
            raise RoleRefused("FAILED_PRECONDITION: worker d is prefill, not decode", Role.PREFILL)
        for delta in (Delta([5], "x"), Delta([IM_END], "", "stop")):
            yield delta


def test_a_role_refusal_updates_the_workers_role_and_is_no_health_failure() -> None:
    """The worker that refused is seen as what it said it is (so prefill can place on it at once), it
    stays healthy, and the KV goes to the other decode worker."""
    client = RoleSwitched(refusing=set())
    views = [WorkerView("p1", "p1:1", Role.PREFILL), WorkerView("d", "d:1", Role.DECODE, free_blocks=100),
             WorkerView("e", "e:1", Role.DECODE, free_blocks=10)]
    registry = Registry(views)
    pipeline = Pipeline(registry, client, RouterMetrics("m"), budgets=Budgets(placement_wait_s=1))  # type: ignore[arg-type]

    async def collect() -> list[int]:
        return [t async for d in pipeline.run([1, 9], Sampling(max_tokens=8, temperature=0)) for t in d.token_ids]

    assert asyncio.run(collect()) == [5, IM_END]
    assert client.decodes == ["d:1", "e:1"]
    assert registry.unhealthy == [] and registry.roles == {"d:1": Role.PREFILL}


class HandingOver(Client):
    """Each endpoint sends one token, then hands the stream over, `times` times in all; then completes."""

    def __init__(self, times: int) -> None:
        super().__init__({})
        self.times = times

    async def generate(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                       resumed_output_tokens: int = 0, images: Sequence[PromptImage] = (),
                       ) -> AsyncGenerator[Delta, None]:
        self.calls.append((endpoint, prompt, resumed_output_tokens))
        if len(self.calls) > self.times:
            yield Delta([IM_END], "", "stop")
            return
        yield Delta([5], "x")
        raise HandedOver("worker handed the stream over to balance decode load")


def test_hand_overs_are_not_failures() -> None:
    """Three hand-overs in a row (max_retries is 2): the stream goes on, alternating between the two
    workers (never straight back to the one that handed it over), and none is marked unhealthy."""
    client = HandingOver(times=3)
    views = [WorkerView("a", "a:1", Role.DECODE), WorkerView("b", "b:1", Role.DECODE)]
    registry = Registry(views)
    pipeline = Pipeline(registry, client, RouterMetrics("m"), budgets=Budgets(placement_wait_s=1))  # type: ignore[arg-type]
    trace = Trace("r")

    async def collect() -> list[int]:
        return [t async for d in pipeline.run([1, 9], Sampling(max_tokens=8, temperature=0), trace)
                for t in d.token_ids]

    assert asyncio.run(collect()) == [5, 5, 5, IM_END]
    assert trace.attempts == [Attempt.FRESH] + [Attempt.MIGRATE] * 3
    endpoints = [c[0] for c in client.calls]
    assert all(x != y for x, y in itertools.pairwise(endpoints)) and registry.unhealthy == []
    assert [c[2] for c in client.calls] == [0, 1, 2, 3]


class LostKv(PrefillClient):
    """The decode worker cannot obtain the prefilled KV (the prefill worker is gone)."""

    async def decode(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                     ticket: Ticket, images: Sequence[PromptImage] = ()) -> AsyncGenerator[Delta, None]:
        self.decodes.append(endpoint)
        raise HandOffFailed("ABORTED: the source did not hold the KV")
        yield Delta([], "")  # pragma: no cover (a generator)


def test_a_failed_hand_off_is_a_local_prefill_on_the_same_decode_worker() -> None:
    client = LostKv(refusing=set())
    trace = Trace("r")
    assert prefill_run(client, trace=trace) == [5, 7, IM_END]  # the prefill's first token was sent already
    assert trace.attempts == [Attempt.FRESH, Attempt.LOCAL_PREFILL] and trace.local_prefill
    assert client.calls == [("d:1", [1, 9, 5], 1)]  # prompt + the token sent, prefilled where it decodes


class ChoicesClient(Client):
    """a:1 streams two choices' first tokens, then fails; b:1 answers any resumed choice with 8, stop."""

    def __init__(self) -> None:
        super().__init__({"a:1": ([Delta([5], "x", index=0), Delta([6], "y", index=1)], True),
                          "b:1": ([Delta([8], "w"), Delta([IM_END], "", "stop")], False)})
        self.seeds: list[int | None] = []

    async def generate(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                       resumed_output_tokens: int = 0, images: Sequence[PromptImage] = (),
                       ) -> AsyncGenerator[Delta, None]:
        self.seeds.append(sampling.seed)
        assert sampling.n == (2 if endpoint == "a:1" else 1)
        async for delta in super().generate(endpoint, request_id, prompt, sampling, resumed_output_tokens, images):
            yield delta


def test_n_choices_resume_each_on_its_own_with_its_seed() -> None:
    client = ChoicesClient()
    views = [WorkerView("a", "a:1", Role.DECODE), WorkerView("b", "b:1", Role.DECODE)]
    pipeline = Pipeline(Registry(views), client, RouterMetrics("m"), budgets=Budgets(placement_wait_s=1))  # type: ignore[arg-type]

    async def collect() -> list[Delta]:
        return [d async for d in pipeline.run([1, 9], Sampling(max_tokens=8, temperature=1.0, seed=3, n=2))]

    deltas = asyncio.run(collect())
    per_choice = {i: [t for d in deltas if d.index == i for t in d.token_ids] for i in (0, 1)}
    assert per_choice == {0: [5, 8, IM_END], 1: [6, 8, IM_END]}
    assert sorted(call[1:] for call in client.calls[1:]) == [([1, 9, 5], 1), ([1, 9, 6], 1)]
    assert client.seeds[0] == 3 and sorted(client.seeds[1:], key=str) == sorted([3, choice_seed(3, 1)], key=str)


class SiblingsClient(Client):
    """a:1 streams two choices' first tokens and fails; of the two resumed choices, the one placed first
    gets one token and its worker then fails (once its sibling has been placed elsewhere: the trace's
    last placement is the sibling's); every later call answers 8, stop."""

    def __init__(self) -> None:
        super().__init__({"a:1": ([Delta([5], "x", index=0), Delta([6], "y", index=1)], True)})
        self.sibling_placed = asyncio.Event()

    async def generate(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                       resumed_output_tokens: int = 0, images: Sequence[PromptImage] = (),
                       ) -> AsyncGenerator[Delta, None]:
        if endpoint == "a:1":
            async for delta in super().generate(endpoint, request_id, prompt, sampling, resumed_output_tokens,
                                                images):
                yield delta
            return
        self.calls.append((endpoint, prompt, resumed_output_tokens))
        if len(self.calls) == 3:
            self.sibling_placed.set()
        if len(self.calls) == 2:  # the first resumed choice
            yield Delta([7], "v")
            await asyncio.wait_for(self.sibling_placed.wait(), 10)
            raise WorkerFailed("UNAVAILABLE: Stream removed (Socket closed)")
        yield Delta([8], "w")
        yield Delta([IM_END], "", "stop")


def test_a_resumed_choice_that_fails_blames_its_own_worker_not_its_siblings() -> None:
    from triphase.router.policy.routing import POLICIES

    client = SiblingsClient()
    registry = Registry([WorkerView(w, f"{w}:1", Role.DECODE) for w in "abc"])
    pipeline = Pipeline(registry, client, RouterMetrics("m"), budgets=Budgets(placement_wait_s=1),  # type: ignore[arg-type]
                        policy=POLICIES["round-robin"])

    async def collect() -> list[Delta]:
        return [d async for d in pipeline.run([1, 9], Sampling(max_tokens=8, temperature=1.0, seed=3, n=2))]

    deltas = asyncio.run(collect())
    assert all(any(d.index == i and d.finish_reason == "stop" for d in deltas) for i in (0, 1))
    first, sibling = client.calls[1][0], client.calls[2][0]
    assert first != sibling  # the two choices went to different workers
    assert registry.unhealthy == ["a:1", first]  # not the sibling's worker, placed after it
