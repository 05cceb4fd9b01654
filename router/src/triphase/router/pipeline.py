"""The request path as named stages: validate -> tokenize -> encode -> place -> prefill -> hand-off ->
decode.

Encode: a request's images are spread over the encode workers, which encode and keep them; each
image then names its encode worker, where the prefill worker reads the embeddings. Without encode
workers (or when one fails) the image goes to the prefill worker with its bytes and is encoded there.

`Pipeline.run` takes a validated, tokenized request and yields `Delta`s. Placement is delegated to
the pure pairing policy; this module does the waiting and the fallbacks: no prefill worker, or a
failed prefill or KV hand-off, means the decode worker prefills locally. A decode worker that fails
mid-stream (or hands the request over while switching roles) is replaced: the request resumes
elsewhere with the tokens already sent appended to its prompt. When no worker can take a request
(all restarting, say), it waits up to `Budgets.placement_wait_s` for one before answering 503. Each try is an
`Attempt` (FRESH, then LOCAL_PREFILL after a failed KV hand-off, MIGRATE after a failed or handed-over
stream), recorded in the request's `Trace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

from triphase.common.block_hash import ImageSpan, prompt_block_hashes, salted_root
from triphase.common.roles import Role
from triphase.common.sampling import choice_seed
from triphase.router.errors import Unavailable
from triphase.router.metrics import RouterMetrics
from triphase.router.policy.pairing import Placement, WorkerView
from triphase.router.policy.routing import POLICIES, RoutingPolicy
from triphase.router.registry import Registry
from triphase.router.worker_client import (
    Delta,
    HandedOver,
    HandOffFailed,
    KvTicket,
    PromptImage,
    RoleRefused,
    Sampling,
    WorkerClient,
    WorkerFailed,
)

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Budgets:
    """How hard the pipeline tries before it answers 503, per request."""

    failed_workers: int = 2  # workers that may fail it (each failure after the first try: another worker)
    hand_overs: int = 8  # streams given back (role switches, balancing): more means workers flapping
    placement_wait_s: float = 30.0  # how long it waits for a worker to (re)appear when none can take it


class Attempt(enum.Enum):
    """How the pipeline tries to run a request, in order: FRESH first; LOCAL_PREFILL after a failed KV
    hand-off; MIGRATE after the decode worker failed or handed the stream over."""

    FRESH = "fresh"  # encode -> place a pair -> prefill -> hand the KV off -> decode
    LOCAL_PREFILL = "local-prefill"  # the same decode worker prefills the prompt (+ tokens sent) itself
    MIGRATE = "migrate"  # another decode worker prefills the prompt + the tokens sent, and decodes on


@dataclasses.dataclass
class Trace:
    """What happened to one request (for metrics and tests)."""

    request_id: str
    api_key: str = ""  # the name of the client's key (api_keys.py), "" without keys
    prefill_worker: str | None = None
    decode_worker: str | None = None
    decode_endpoint: str | None = None
    kv_backend: str | None = None
    local_prefill: bool = False
    migrations: int = 0
    encoded_on: list[str] = dataclasses.field(default_factory=list)  # encode worker of each image ("": none)
    attempts: list[Attempt] = dataclasses.field(default_factory=list)  # in order
    client_gone: bool = False  # the client hung up before the end (set by the HTTP layer)


def _choice_trace(trace: Trace, index: int) -> Trace:
    """A resumed choice's own trace: its placement is its own (a failure blames the worker that served
    this choice, not the one a sibling was placed on last) and so are its resumed request ids; the
    list of attempts stays the request's."""
    return dataclasses.replace(trace, request_id=f"{trace.request_id}-c{index}", decode_worker=None,
                               decode_endpoint=None)


class Pipeline:
    def __init__(self, registry: Registry, client: WorkerClient, metrics: RouterMetrics, *,
                 block_size: int = 16, budgets: Budgets = Budgets(), prefix_salt: bytes = b"",
                 policy: RoutingPolicy = POLICIES["kv-aware"]) -> None:
        self.hash_root = salted_root(prefix_salt)  # the workers' salt: the same hashes as their caches
        self.budgets = budgets
        self.policy = policy  # where requests go (policy/routing.py)
        self._turns = itertools.count()  # the policy's turn: one per placement (round-robin's counter)
        self.registry = registry
        self.client = client
        self.metrics = metrics
        self.block_size = block_size
        self._encode_turn = 0  # rotates which encode worker a request's first image goes to

    def _hashes(self, prompt: list[int], images: Sequence[PromptImage]) -> list[int]:
        spans: list[ImageSpan] = [image.span for image in images]
        return prompt_block_hashes(prompt, self.block_size, spans, self.hash_root)

    async def encode(self, images: Sequence[PromptImage], trace: Trace) -> list[PromptImage]:
        """The encode stage: each image encoded on an encode worker (a request's images spread over
        them, a failed worker's image tried on the next), which then holds its embeddings; an image no
        encode worker took keeps only its bytes, for the prefill worker to encode."""
        if not images:
            return []
        encoders = [w for w in self.registry.snapshot() if w.role is Role.ENCODE and w.available]
        if not encoders:
            trace.encoded_on = [""] * len(images)
            self.metrics.images_encoded(None, 0, len(images))
            return list(images)
        turn, self._encode_turn = self._encode_turn, self._encode_turn + len(images)
        started = time.monotonic()

        async def one(index: int, image: PromptImage) -> PromptImage:
            for attempt in range(min(len(encoders), self.budgets.failed_workers + 1)):
                worker = encoders[(turn + index + attempt) % len(encoders)]
                try:
                    key, slot, ticket = await self.client.encode(worker.endpoint, image.data)
                    if key == image.digest:
                        return dataclasses.replace(image, source=worker.endpoint, slot=slot, ticket=ticket)
                except WorkerFailed as exc:
                    self._worker_failed(worker.endpoint, exc)
                    logger.warning("%s: encode worker %s failed (%s)", trace.request_id, worker.worker_id, exc)
            return image

        done = await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))
        trace.encoded_on = [image.source for image in done]
        on_pool = sum(1 for image in done if image.source)
        self.metrics.images_encoded(time.monotonic() - started if on_pool else None, on_pool, len(done) - on_pool)
        return done

    async def run(self, prompt: list[int], sampling: Sampling, trace: Trace | None = None,
                  images: Sequence[PromptImage] = ()) -> AsyncGenerator[Delta, None]:
        """Stream a request's deltas. If the decode worker fails mid-stream, the request resumes on
        another worker (prompt + tokens already sent, re-prefilled there): the client sees one
        uninterrupted stream. After `Budgets.failed_workers` failed workers: `Unavailable` (a 503). A worker that
        hands the stream back (switching role, balancing load) has not failed: the stream resumes on
        another worker and counts against `Budgets.hand_overs` only. With n > 1 choices, see `_choices`."""
        trace = trace or Trace(f"req-{uuid.uuid4().hex[:16]}")
        images = await self.encode(images, trace)
        stream = self._choices(prompt, sampling, trace, images) if sampling.n > 1 else \
            self._attempts(prompt, sampling, trace, images, [], set())
        async with contextlib.aclosing(stream) as deltas:
            async for delta in deltas:
                yield delta

    async def _choices(self, prompt: list[int], sampling: Sampling, trace: Trace,
                       images: Sequence[PromptImage]) -> AsyncGenerator[Delta, None]:
        """n > 1: the prompt is prefilled and handed off once; the decode worker forks the choices, which
        share its KV blocks. After any failure each unfinished choice resumes on its own, as a request
        with n = 1 and the seed that choice had (common sampling.choice_seed): the same tokens it would have
        drawn, at the cost of computing the prompt once per choice."""
        sent: list[list[int]] = [[] for _ in range(sampling.n)]
        finished = [False] * sampling.n
        failed: set[str] = set()
        trace.attempts.append(Attempt.FRESH)
        try:
            async with contextlib.aclosing(self._place_and_run(prompt, sampling, trace, failed, images)) as deltas:
                async for delta in deltas:
                    sent[delta.index].extend(delta.token_ids)
                    finished[delta.index] = finished[delta.index] or delta.finish_reason is not None
                    yield delta
                    if all(finished):
                        return
        except WorkerFailed as exc:
            if not isinstance(exc, (HandOffFailed, HandedOver)) and trace.decode_endpoint:
                self._worker_failed(trace.decode_endpoint, exc)
                failed.add(trace.decode_worker or "")
            self.metrics.migrated()
            logger.warning("%s: %d of %d choices unfinished on %s (%s); resuming each on its own", trace.request_id,
                           finished.count(False), sampling.n, trace.decode_worker, exc)
        resumes = {i: self._attempts(prompt, dataclasses.replace(sampling, n=1, seed=choice_seed(sampling.seed, i)),
                                     _choice_trace(trace, i), images, sent[i], set(failed), Attempt.MIGRATE)
                   for i in range(sampling.n) if not finished[i]}
        async with contextlib.aclosing(_merged(resumes)) as deltas:
            async for index, delta in deltas:
                yield dataclasses.replace(delta, index=index)

    async def _attempts(self, prompt: list[int], sampling: Sampling, trace: Trace, images: Sequence[PromptImage],
                        sent: list[int], failed: set[str], attempt: Attempt = Attempt.FRESH,
                        ) -> AsyncGenerator[Delta, None]:
        """One choice's stream, tried as `Attempt`s until it ends; `sent`: its tokens the client already
        has, `failed`: the workers that failed it."""
        handed: list[str] = []  # workers that gave the stream back (a switch, balancing): not failures
        while True:
            trace.attempts.append(attempt)
            if attempt is Attempt.FRESH:
                stream = self._place_and_run(prompt, sampling, trace, failed, images)
            else:
                avoid = failed | set(handed[-1:])  # not straight back to the worker that handed it over
                stream = self._resume(prompt, sampling, trace, sent, avoid, attempt is Attempt.LOCAL_PREFILL, images)
            try:
                async with contextlib.aclosing(stream) as deltas:
                    async for delta in deltas:
                        sent.extend(delta.token_ids)
                        yield delta
                        if delta.finish_reason is not None:
                            # Complete: a worker that fails after its last delta (before the
                            # stream's status arrives) must not get the request resumed, which
                            # would continue past the stop token.
                            return
                return
            except HandOffFailed as exc:
                # The prefill worker's KV could not be had: the decode worker prefills prompt + first token.
                if attempt is not Attempt.FRESH:
                    raise Unavailable(f"the request failed after a failed KV hand-off: {exc}") from None
                logger.warning("%s: KV hand-off to %s failed (%s); prefilling there", trace.request_id,
                               trace.decode_worker, exc)
                trace.local_prefill = True
                trace.kv_backend = None
                attempt = Attempt.LOCAL_PREFILL
                continue
            except HandedOver as exc:
                attempt = Attempt.MIGRATE
                handed.append(trace.decode_worker or "")
                if len(handed) > self.budgets.hand_overs:
                    raise Unavailable(f"the request was handed over {len(handed)} times: {exc}") from None
                self.metrics.migrated()
                logger.info("%s: decode worker %s handed the stream over after %d tokens (%s); resuming elsewhere",
                            trace.request_id, trace.decode_worker, len(sent), exc)
            except WorkerFailed as exc:
                attempt = Attempt.MIGRATE
                if trace.decode_endpoint:
                    self._worker_failed(trace.decode_endpoint, exc)
                failed.add(trace.decode_worker or "")
                if len(failed) > self.budgets.failed_workers:
                    raise Unavailable(f"the request failed on {len(failed)} workers; last error: {exc}") from None
                self.metrics.migrated()
                logger.warning("%s: decode worker %s failed after %d tokens (%s); resuming elsewhere",
                               trace.request_id, trace.decode_worker, len(sent), exc)

    async def _place_and_run(self, prompt: list[int], sampling: Sampling, trace: Trace, failed: set[str],
                             images: Sequence[PromptImage]) -> AsyncGenerator[Delta, None]:
        placement = await self._placement(prompt, failed, images)
        decode = placement.decode
        trace.decode_worker, trace.decode_endpoint = decode.worker_id, decode.endpoint
        with self.registry.streaming(decode.endpoint):  # counted in its load from placement on
            prefill, tried = placement.prefill, set(failed)
            while prefill is not None:
                trace.prefill_worker = prefill.worker_id
                try:
                    with self.registry.prefilling(prefill.endpoint, len(prompt)):
                        ticket, first = await self.client.prefill(prefill.endpoint, trace.request_id, prompt, sampling,
                                                                  images)
                except WorkerFailed as exc:
                    # Another prefill worker rather than the decode worker if there is one: a local
                    # prefill stalls every stream on the decode worker (what disaggregation avoids);
                    # a prefill worker that switches role hands its whole queue back at once.
                    self._worker_failed(prefill.endpoint, exc)
                    tried.add(prefill.worker_id)
                    failed_on, prefill = prefill.worker_id, None
                    if len(tried) - len(failed) <= self.budgets.failed_workers:
                        prefill = self.policy.select_prefill(self._hashes(prompt, images), self.registry.snapshot(),
                                                             decode.worker_id, frozenset(tried), next(self._turns))
                    logger.warning("%s: prefill on %s failed (%s); prefilling on %s", trace.request_id, failed_on,
                                   exc, prefill.worker_id if prefill else decode.worker_id)
                    continue
                async with contextlib.aclosing(self._hand_off(decode.endpoint, prompt, sampling, trace, ticket,
                                                              first, images)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            trace.local_prefill = True
            async with contextlib.aclosing(self.client.generate(decode.endpoint, trace.request_id, prompt,
                                                                sampling, images=images)) as deltas:
                async for delta in deltas:
                    yield delta

    async def _resume(self, prompt: list[int], sampling: Sampling, trace: Trace, sent: list[int],
                      failed: set[str], stay: bool, images: Sequence[PromptImage]) -> AsyncGenerator[Delta, None]:
        """LOCAL_PREFILL and MIGRATE: continue on a decode-capable worker, which re-prefills prompt +
        sent tokens: the same one (`stay`, after a failed hand-off) or a healthy one not in `failed`
        (after a failed worker or a hand-over)."""
        remaining = sampling.max_tokens - len(sent)
        if remaining <= 0:
            return
        resumed = prompt + sent
        endpoint = trace.decode_endpoint if stay else None
        if endpoint is None:
            placement = await self._placement(resumed, failed, images)
            trace.decode_worker, trace.decode_endpoint = placement.decode.worker_id, placement.decode.endpoint
            endpoint = placement.decode.endpoint
        trace.migrations += 1
        request_id = f"{trace.request_id}-r{trace.migrations}"
        # once a token is sent, the client has the prompt's logprobs (if it asked): they came with it
        stream = self.client.generate(endpoint, request_id, resumed, dataclasses.replace(
            sampling, max_tokens=remaining, prompt_logprobs=None if sent else sampling.prompt_logprobs),
            len(sent), images)
        with self.registry.streaming(endpoint):
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    yield delta

    async def _placement(self, prompt: list[int], failed: set[str], images: Sequence[PromptImage]) -> Placement:
        """Where to run the request; waits up to placement_wait_s for a worker to (re)appear. Workers
        that failed this request are avoided while another can take it; one that reports healthy
        again (restarted, or back from a role switch) is used rather than none."""
        hashes = self._hashes(prompt, images)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budgets.placement_wait_s

        def choose() -> Placement | None:
            workers = self.registry.snapshot()
            turn = next(self._turns)
            return self.policy.select(hashes, workers, frozenset(failed), turn) or \
                self.policy.select(hashes, workers, turn=turn)

        while (placement := choose()) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable("no decode worker is available")
            self.registry.changed.clear()  # set by every stats update and every worker change
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry.changed.wait(), remaining)
        return placement

    async def _hand_off(self, endpoint: str, prompt: list[int], sampling: Sampling, trace: Trace, ticket: KvTicket,
                        first: Delta, images: Sequence[PromptImage]) -> AsyncGenerator[Delta, None]:
        yield first  # the prefill worker's first token goes out before the KV moves
        if first.finish_reason is not None and sampling.n == 1:  # with n > 1 the other choices need the KV
            await self.client.release(ticket)
            return
        started = time.monotonic()
        adopted = False  # the decode worker has the KV (it then releases the prefill worker's copy)
        tried = {trace.decode_worker or ""}
        try:
            with contextlib.ExitStack() as counted:
                while True:
                    try:
                        stream = self.client.decode(endpoint, trace.request_id, prompt,
                                                    dataclasses.replace(sampling, prompt_logprobs=None), ticket, images)
                        async with contextlib.aclosing(stream) as deltas:
                            async for delta in deltas:
                                if not adopted:  # the decode worker repeats the first token: already sent
                                    adopted = True
                                    trace.kv_backend = backend = delta.kv_backend or "grpc"
                                    self.metrics.kv_handoff(backend, time.monotonic() - started, ticket.nbytes)
                                    logprobs = delta.logprobs[1:] if len(delta.logprobs) == len(delta.token_ids) \
                                        else delta.logprobs
                                    delta = dataclasses.replace(delta, token_ids=delta.token_ids[1:], text="",
                                                                logprobs=logprobs)
                                    if not delta.token_ids and delta.finish_reason is None:
                                        continue
                                yield delta
                        return
                    except HandOffFailed:
                        raise
                    except WorkerFailed as exc:
                        # Refused before it took the KV (it is switching role, draining or gone): the KV
                        # is still pinned on the prefill worker, so another decode worker takes the same
                        # ticket. Resuming instead would prefill the whole prompt again on a decode worker.
                        if adopted or len(tried) > self.budgets.failed_workers or \
                                (other := self._another_decode(prompt, tried, images)) is None:
                            raise
                        self._worker_failed(endpoint, exc)
                        logger.warning("%s: decode worker %s refused the hand-off (%s); handing off to %s",
                                       trace.request_id, trace.decode_worker, exc, other.worker_id)
                        tried.add(other.worker_id)
                        trace.decode_worker, trace.decode_endpoint = other.worker_id, other.endpoint
                        endpoint = other.endpoint
                        counted.enter_context(self.registry.streaming(endpoint))
        finally:
            if not adopted:  # failed or cancelled before the hand-off completed: unpin now
                await self.client.release(ticket)

    def _worker_failed(self, endpoint: str, exc: WorkerFailed) -> None:
        """A call to a worker failed: one that refused it for its role (it switched since its last stats)
        is seen in the role it said it has; any other failure takes the worker out until its stats
        stream answers again."""
        if isinstance(exc, RoleRefused):
            self.registry.set_role(endpoint, exc.role)
        else:
            self.registry.mark_unhealthy(endpoint)

    def _another_decode(self, prompt: list[int], tried: set[str], images: Sequence[PromptImage]) -> WorkerView | None:
        placement = self.policy.select(self._hashes(prompt, images), self.registry.snapshot(), frozenset(tried),
                                       next(self._turns))
        return placement.decode if placement is not None and placement.decode.worker_id not in tried else None


async def _merged(streams: dict[int, AsyncGenerator[Delta, None]]) -> AsyncGenerator[tuple[int, Delta], None]:
    """The deltas of several streams as they come, each with its key; the first error ends them all."""
    queue: asyncio.Queue[tuple[int, Delta | None, Exception | None]] = asyncio.Queue()

    async def pump(key: int, stream: AsyncGenerator[Delta, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    await queue.put((key, delta, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((key, None, exc))
            return
        await queue.put((key, None, None))

    tasks = [asyncio.create_task(pump(key, stream)) for key, stream in streams.items()]
    try:
        running = len(tasks)
        while running:
            key, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                running -= 1
            else:
                yield key, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
