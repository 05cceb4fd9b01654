"""The engine on its own thread, driven from asyncio.

`Engine` is single-threaded. `AsyncEngine` owns one thread that runs every engine call: commands
from the event loop (add, abort, prefill, import, release, read) are queued to it, and each
step's outputs are handed back to per-request asyncio queues with `call_soon_threadsafe`. The
thread steps while there is work and sleeps on the command queue otherwise, so an idle worker
costs nothing. Pinned prefill KV that nobody reads is released after `pin_timeout_s`.

Failures: a step that raises fails only its own requests (`Engine.step` aborts them; their streams
end with `EngineFailed`) and the thread steps on. Anything else that escapes the loop, or
`max_step_failures` failed steps in a row, kills the engine: every stream ends with `EngineFailed`,
later calls raise it, and `health()` says "dead" (the worker then exits non-zero to be restarted).
`health()` is "stalled" while there is work but the thread has not come round its loop for
`stall_timeout_s` (a step that does not return), and "dead" after three times as long; both take
the worker out of service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import torch

from triphase.workers.engine.core import Engine, KvExport, RequestOutput, StepFailed
from triphase.workers.engine.multimodal import ImageInput
from triphase.workers.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


class EngineFailed(Exception):
    """The engine could not compute a request (its step failed) or is dead; the message is safe to
    show to a client (no internal exception text)."""


IDLE_REFRESH_S = 1.0  # an idle engine re-reads its stats this often (its thread waits this long for work)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    pinned: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    queued_prefill_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    steps: int = 0
    cached_block_hashes: tuple[int, ...] = ()
    prefill_tokens_per_s: float = 0.0
    decode_step_s: float = 0.0
    prefill_tokens_total: int = 0
    moe_routed_tokens: int = 0  # (token, expert) pairs the sparse layers computed (0 for a dense model)
    moe_active_experts: int = 0  # experts that got at least one token, per layer per step


class AsyncEngine:
    def __init__(self, engine: Engine, *, pin_timeout_s: float = 30.0, max_reported_hashes: int = 4096,
                 stall_timeout_s: float = 120.0, max_step_failures: int = 5) -> None:
        self.engine = engine
        self.pin_timeout_s = pin_timeout_s
        self.max_reported_hashes = max_reported_hashes
        self.stall_timeout_s = stall_timeout_s
        self.max_step_failures = max_step_failures
        self.failure: BaseException | None = None  # why the engine died (None while alive)
        self.step_failures = 0  # failed steps since start (each failed only its own requests)
        self._progress_at = time.monotonic()  # the thread's last pass round its loop
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        # Pinned prefills, by when they were pinned. Guarded by a lock rather than owned by the engine
        # thread, so that ReleaseKv is answered at once (the proof a decode worker waits for) instead
        # of after the step in progress; freeing the blocks is queued for the engine thread.
        self._pins: dict[str, float] = {}
        self._pin_lock = threading.Lock()
        self._exporting: set[str] = set()  # prefill-only requests (engine thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = EngineStats()
        self._hashes: tuple[int, ...] = ()
        self._hashes_version = -1
        self.stats_changed = asyncio.Event()
        self.pins_expired = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish_stats()  # true from the first report: an idle new worker has all its blocks free
        self._thread = threading.Thread(target=self._run, name="triphase-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._commands.put(lambda: None)  # wake the thread
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def health(self) -> str:
        """ "ok", "stalled" (work waits but the loop has not turned for stall_timeout_s) or "dead"
        (the thread ended, or stalled three times that long)."""
        if self.failure is not None or (self._thread is not None and not self._thread.is_alive()):
            return "dead"
        idle_for = time.monotonic() - self._progress_at
        if self.engine.has_work and idle_for > self.stall_timeout_s:
            return "dead" if idle_for > 3 * self.stall_timeout_s else "stalled"
        return "ok"

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            self._loop_until_stopped()
        except BaseException as exc:  # the bookkeeping itself failed: nothing can be trusted any more
            logger.critical("Engine stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self.failure = exc
            self._fail_everything()

    def _loop_until_stopped(self) -> None:
        consecutive = 0
        while not self._stopping:
            self._progress_at = time.monotonic()
            ran = 0
            block = not self.engine.has_work
            try:
                command = self._commands.get(timeout=IDLE_REFRESH_S) if block else self._commands.get_nowait()
                command()
                ran = 1
                while True:  # everything queued runs before the next step
                    self._commands.get_nowait()()
                    ran += 1
            except queue.Empty:
                pass
            stepped = self.engine.has_work
            if stepped:
                try:
                    outputs = self.engine.step()
                except StepFailed as exc:
                    consecutive += 1
                    self.step_failures += 1
                    logger.error("Step failed; failing its %d requests", len(exc.request_ids), exc_info=exc.cause)
                    for request_id in exc.request_ids:
                        self._deliver(request_id, EngineFailed("the engine failed while computing this request"))
                    if consecutive >= self.max_step_failures:
                        raise RuntimeError(f"{consecutive} steps in a row failed") from exc
                    outputs = []
                else:
                    consecutive = 0
                if outputs:  # one callback for the step: every stream's consumer runs before anyone it wakes
                    self._deliver_step([(out.request_id, self._with_export(out)) for out in outputs])
            if ran or stepped or block:  # idle: refreshed once per IDLE_REFRESH_S at most
                self._publish_stats()
            self._expire_pins()

    def _fail_everything(self) -> None:
        """The engine is dead: end every stream and every queued call with EngineFailed."""
        for request_id in list(self._streams):
            self._deliver(request_id, EngineFailed("the engine stopped"))
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()  # `call` wrapped it: with the engine dead it hands EngineFailed to its caller

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)

    def _deliver_step(self, items: list[tuple[str, Any]]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._put_step, items)

    def _put_step(self, items: list[tuple[str, Any]]) -> None:
        streams = self._streams
        for request_id, item in items:
            if (stream := streams.get(request_id)) is not None:
                stream.put_nowait(item)

    def _publish_stats(self) -> None:
        engine = self.engine
        sched, kv = engine.scheduler, engine.kv
        # Prompt tokens not yet computed: queued requests, and running ones part-way through a
        # chunked prefill (a decoding request has exactly one token to compute).
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        queued += sum(left for r in sched.running if (left := r.num_tokens - r.num_computed_tokens) > 1)
        if kv.pool.cached_version != self._hashes_version:  # copy the index only when it changed
            self._hashes = tuple(itertools.islice(kv.pool.cached, self.max_reported_hashes))
            self._hashes_version = kv.pool.cached_version
        hashes = self._hashes
        load = engine.model.expert_load if engine.model is not None else None
        self.stats = EngineStats(
            running=len(sched.running), waiting=len(sched.waiting), pinned=len(sched.pinned),
            free_blocks=kv.num_free_blocks, total_blocks=kv.pool.num_blocks, queued_prefill_tokens=queued,
            prefix_queries=kv.prefix_queries, prefix_hits=kv.prefix_hits, preemptions=sched.num_preemptions,
            steps=engine.num_steps, cached_block_hashes=hashes,
            prefill_tokens_per_s=engine.rates.prefill_tokens_per_s, decode_step_s=engine.rates.decode_step_s,
            prefill_tokens_total=engine.rates.prefill_tokens_total,
            moe_routed_tokens=load.routed_tokens if load else 0, moe_active_experts=load.active_experts if load else 0,
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stats_changed.set)

    def _with_export(self, out: RequestOutput) -> Any:
        """A prefill-only request's output travels with its export, made in the same turn of the
        engine thread (a command queued after the output would wait for the next step)."""
        if out.request_id not in self._exporting:
            return out
        self._exporting.discard(out.request_id)
        export = self.engine.export_kv(out.request_id)
        with self._pin_lock:
            self._pins[out.request_id] = time.monotonic()
        return out, export

    def _expire_pins(self) -> None:
        if not self._pins:
            return
        now = time.monotonic()
        with self._pin_lock:
            expired = [rid for rid, since in self._pins.items() if now - since > self.pin_timeout_s]
            for request_id in expired:
                del self._pins[request_id]
        for request_id in expired:
            if self.engine.release_kv(request_id):
                self.pins_expired += 1
                logger.warning("Released unread KV of %s after %.0f s", request_id, self.pin_timeout_s)
                self._publish_stats()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread and await its result (exceptions propagate)."""
        assert self._loop is not None, "start() first"
        if self.failure is not None:
            raise EngineFailed("the engine stopped")
        future: asyncio.Future[T] = self._loop.create_future()
        loop = self._loop

        def run() -> None:
            try:
                if self.failure is not None:
                    raise EngineFailed("the engine stopped")
                result = fn()
            except BaseException as exc:  # handed to the awaiting coroutine, which re-raises
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(run)
        if self.failure is not None:  # the thread died as this was queued: run what it left behind
            self._fail_everything()
        return await future

    # ------------------------------------------------------------------ requests
    async def generate(self, request_id: str, prompt: Sequence[int], sampling: SamplingParams,
                       output_offset: int = 0, images: Sequence[ImageInput] = (),
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; cancelling the consumer aborts the request at once."""
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = stream
        ended = False
        try:
            await self.call(lambda: self.engine.add_request(request_id, prompt, sampling, output_offset=output_offset,
                                                            images=images))
            async for out in self._drain(stream):
                ended = out.done
                yield out
        finally:
            await self._finish(request_id, ended)

    def interrupt(self, request_id: str, exc: BaseException) -> bool:
        """End a request's stream by raising `exc` in its consumer (which then aborts it)."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        stream.put_nowait(exc)
        return True

    async def _drain(self, stream: asyncio.Queue[Any]) -> AsyncGenerator[RequestOutput, None]:
        while True:
            out = await stream.get()
            if out is _END:
                return
            if isinstance(out, BaseException):
                raise out
            yield out
            if out.done:
                return

    async def _finish(self, request_id: str, ended: bool) -> None:
        self._streams.pop(request_id, None)
        if not ended:  # the consumer went away, or an error: abort frees its blocks now
            await self._abort(request_id)

    async def _abort(self, request_id: str) -> None:
        def run() -> None:
            self._exporting.discard(request_id)
            with self._pin_lock:  # an aborted request's blocks are freed: no release may vouch for them
                self._pins.pop(request_id, None)
            self.engine.abort(request_id)

        with contextlib.suppress(EngineFailed):  # a dead engine has nothing left to free
            await asyncio.shield(self.call(run))

    async def prefill(self, request_id: str, prompt: Sequence[int], sampling: SamplingParams,
                      images: Sequence[ImageInput] = ()) -> tuple[KvExport, RequestOutput]:
        """Prefill only; the KV stays pinned until `release` (or the pin timeout)."""
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = stream

        def add() -> None:
            self.engine.add_request(request_id, prompt, sampling, prefill_only=True, images=images)
            self._exporting.add(request_id)

        try:
            await self.call(add)
            item = await stream.get()
            if isinstance(item, BaseException):
                raise item
        except BaseException:
            self._streams.pop(request_id, None)
            await self._abort(request_id)
            raise
        self._streams.pop(request_id, None)
        first, export = item
        return export, first

    async def release(self, request_id: str) -> bool:
        """Unpin a prefilled request's KV; True if it was still pinned (not expired, not released
        before). Answered at once; the blocks are freed on the engine thread before its next step."""
        if self.failure is not None:
            raise EngineFailed("the engine stopped")
        with self._pin_lock:
            held = self._pins.pop(request_id, None) is not None
        if held:
            def free() -> None:
                self.engine.release_kv(request_id)

            self._commands.put(free)
        return held

    async def read_pinned(self, request_id: str, check: Callable[[list[int]], None] | None = None,
                          ) -> torch.Tensor:
        """A copy of a pinned request's blocks (for the gRPC stream connector); `check(block ids)` runs
        first and may refuse by raising, before anything is copied."""
        def run() -> torch.Tensor:
            if check is not None:
                check(self.engine.export_kv(request_id).block_ids)
            export = self.engine.export_kv(request_id, with_data=True)
            assert export.data is not None
            return export.data

        return await self.call(run)

    async def import_and_decode(self, request_id: str, prompt: Sequence[int], sampling: SamplingParams,
                                export: KvExport, fill: Callable[[list[int]], Awaitable[None]] | None = None,
                                images: Sequence[ImageInput] = ()) -> AsyncGenerator[RequestOutput, None]:
        """Adopt KV prefilled elsewhere and stream the rest of the request. The KV comes from
        `export.data`, or `fill(destination block ids)` writes it into the reserved blocks (a remote
        READ, off the engine thread). The first output repeats the prefill worker's first token."""
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = stream
        ended = False
        try:
            if fill is None:
                first = await self.call(lambda: self.engine.import_kv(request_id, prompt, sampling, export,
                                                                      images=images)[1])
            else:
                request, dst = await self.call(lambda: self.engine.reserve_import(request_id, prompt, sampling, export,
                                                                                  images))
                try:
                    await fill(dst)
                except BaseException:
                    with contextlib.suppress(EngineFailed):
                        await asyncio.shield(self.call(lambda: self.engine.cancel_import(request_id)))
                    raise
                first = await self.call(lambda: self.engine.commit_import(request, export))
            ended = first.done
            yield first
            if not first.done:
                async for out in self._drain(stream):
                    ended = out.done
                    yield out
        finally:
            await self._finish(request_id, ended)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
