"""HTTP routes of the OpenAI-compatible API (aiohttp): the only module that knows the web framework.

A request runs through named stages: read the body (here), prepare it (prepare.py: parse, template,
tokenize, grammar, sampling), run it (the pipeline, timed here), respond (responses.py: bodies and
SSE chunks, framed and written here).

Every error a client can cause is an OpenAI-style JSON body with a 4xx status; a request that
fails inside the system is a 503 body, never a bare 500 page or a traceback. Streams are server-sent
events ending with `data: [DONE]`. A client that disconnects cancels the handler; closing the
pipeline's stream cancels the gRPC calls, and the workers abort the request and free its blocks.

Work is bounded before it is done: the body is read within `body_timeout_s` and at most
`max_body_bytes` (413); then the request waits for admission; only then is the JSON parsed and the
prompt tokenized, on a thread when the body is large, so the event loop keeps serving others. Text
that could not fit the context even at the longest token's length is refused before tokenizing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from triphase.common.models.tokenizer import Tokenizer
from triphase.common.models.vision import VisionConfig
from triphase.router.admission import Admission
from triphase.router.api_keys import ApiKeys
from triphase.router.errors import (
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    RouterError,
    Unauthorized,
    Unavailable,
)
from triphase.router.metrics import CLIENT_CLOSED, RouterMetrics
from triphase.router.openai import logprobs as lp
from triphase.router.openai import protocol as p
from triphase.router.openai import responses
from triphase.router.openai.images import ImageSources
from triphase.router.openai.openapi import document
from triphase.router.openai.prepare import Preparer
from triphase.router.pipeline import Pipeline, Trace
from triphase.router.worker_client import Delta, PromptImage, Sampling
from triphase.router.worker_session import BACKLOG, SINK

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_COALESCED = 64  # SSE events of one client written together at most
END_S = 5.0  # at the drain deadline: how long the requests still running get to write their ending
SHUTTING_DOWN = Unavailable("the server is shutting down and could not finish this request; retry it")
OFF_LOOP_BYTES = 64 << 10  # bodies larger than this are parsed and tokenized on the parsing thread
# Set once _timed has recorded how the request ended in triphase_requests_total.
COUNTED = web.RequestKey("triphase.counted", bool)

# glibc's malloc_trim (None elsewhere): gives freed heap back to the system
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def _then_trim(fn: Callable[[], T]) -> T:
    """Run `fn`, then return what it freed to the system: parsing and tokenizing a large body allocates
    tens of MiB that glibc would otherwise keep (measured: 60 refused 300,000-character prompts left the
    router 118 MiB larger with a thread pool, 57 MiB with one thread, none with this)."""
    try:
        return fn()
    finally:
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


class Straight:
    """The per-step fast path of one SSE response (worker_session.SINK): the worker session's reader
    writes a step's text to the client's socket as the stream's next event (`event`), framed as the
    response's body is (chunked or not), without waking the request's task. It refuses, and the task
    writes instead, until the response's first event went out through aiohttp (with the status line
    and headers), while the socket holds more than HIGH_WATER unsent bytes (the task waits for a
    client that is behind), and once the connection is closing or the stream has ended."""

    HIGH_WATER = 64 << 10  # aiohttp's own drain threshold

    __slots__ = ("chunked", "event", "open", "transport")

    def __init__(self, transport: asyncio.Transport, chunked: bool, event: Callable[[str], bytes]) -> None:
        self.transport = transport
        self.chunked = chunked
        self.event = event
        self.open = False  # set once aiohttp wrote the response's start

    def __call__(self, text: str) -> bool:
        transport = self.transport
        if not self.open or transport.is_closing() or transport.get_write_buffer_size() > self.HIGH_WATER:
            return False
        if text:
            data = self.event(text)
            transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        return True


async def coalesced(frames: AsyncIterator[bytes], tail: list[bytes]) -> AsyncGenerator[bytes, None]:
    """SSE events as they should be written: a client that fell behind (more of its request's output
    already here: BACKLOG, which counts a stream's end that has arrived too) gets its pending events in
    one write, at most MAX_COALESCED of them. What is pending when the frames end or fail goes to
    `tail`, to be written with the stream's ending: a stream whose end came with its last delta ends
    in one write. (A delta that makes no event, such as held-back tool-call text, can keep the events
    before it for one engine step.)"""
    pending: list[bytes] = []
    try:
        async for frame in frames:
            pending.append(frame)
            if not BACKLOG.get() or len(pending) >= MAX_COALESCED:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
    finally:
        tail.extend(pending)


class Api:
    def __init__(self, pipeline: Pipeline, tokenizer: Tokenizer, metrics: RouterMetrics, *, model: str,
                 max_model_len: int, admission: Admission | None = None, max_body_bytes: int = 2 << 20,
                 body_timeout_s: float = 30.0, vision: VisionConfig | None = None,
                 image_sources: ImageSources | None = None, api_keys: ApiKeys | None = None,
                 drain_timeout_s: float = 30.0) -> None:
        self.pipeline = pipeline
        # Shutdown (`_end_in_flight`): what is in flight gets drain_timeout_s, then ends well-formed.
        self.drain_timeout_s = drain_timeout_s
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.ending = False  # the drain deadline passed: requests still running are being ended
        self.api_keys = api_keys  # None: the API is open
        # One thread parses and tokenizes every large body, in turn (a flood of large bodies costs one
        # core, not all of them), each followed by a trim of what it freed (`_then_trim`).
        self._parser = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="triphase-parse")
        self.prepare = Preparer(tokenizer, model=model, max_model_len=max_model_len, vision=vision,
                                image_sources=image_sources)
        self.token_texts = lp.TokenTexts(tokenizer)
        self.metrics = metrics
        self.model = model
        self.max_model_len = max_model_len
        self.admission = admission or Admission(max_in_flight=256, max_queued=1024)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.draining = False  # shutting down: /readyz answers 503 so that no new traffic comes
        self.traces: dict[str, Trace] = {}  # recent request traces, for /debug and tests

    def app(self, *, internal: bool = True) -> web.Application:
        """The API. `internal`: with /readyz (which lists the workers) and /metrics; without them when
        `internal_app` serves them on a port of their own."""
        app = web.Application(middlewares=[self._errors, self._authenticate], client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/openapi.json", self.openapi)
        if internal:
            self._add_internal(app)
        app.on_shutdown.append(self._end_in_flight)  # runs once the sites no longer accept connections
        return app

    async def _end_in_flight(self, app: web.Application) -> None:
        """Shutdown: the requests in flight get drain_timeout_s to finish; then each one left is ended
        well-formed rather than cut when the process exits: a stream with an error event and
        `data: [DONE]`, any other request with a 503 body."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
        if not self._in_flight:
            return
        self.ending = True
        logger.warning("Ending %d requests still in flight at the drain deadline", len(self._in_flight))
        for task in list(self._in_flight):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), END_S)

    def internal_app(self) -> web.Application:
        """Probes and Prometheus: /healthz, /readyz, /metrics (no key asked; keep the port inside)."""
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/healthz", self.healthz)
        self._add_internal(app)
        return app

    def _add_internal(self, app: web.Application) -> None:
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """/v1/ needs a key when there are keys; its name labels the request's metrics."""
        if self.api_keys is not None and request.path.startswith("/v1/"):
            presented = request.headers.getall("Authorization", [])
            if len(presented) > 1:  # which one a proxy or a library would use is anybody's guess
                raise Unauthorized("send one Authorization header, not several")
            request["api_key"] = self.api_keys.check(presented[0] if presented else None)
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        try:
            return await handler(request)
        except RouterError as exc:
            if COUNTED not in request:
                self.metrics.refused(exc.status, request.get("api_key", ""))
            headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else \
                {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
            return web.json_response(exc.body(), status=exc.status, headers=headers)
        except web.HTTPException as exc:
            if exc.status >= 400:
                error = BadRequest(exc.reason) if exc.status < 500 else RouterError(exc.reason)
                return web.json_response(error.body(), status=exc.status)
            raise
        except asyncio.CancelledError:
            if not self.ending:
                raise
            task.uncancel()  # ended by `_end_in_flight`, which cancelled it: answer instead
            return web.json_response(SHUTTING_DOWN.body(), status=SHUTTING_DOWN.status)
        except ConnectionResetError:
            raise
        except Exception:  # a bug: logged with its traceback, answered without it
            logger.exception("Unhandled error serving %s %s", request.method, request.path)
            if COUNTED not in request:
                self.metrics.refused(500, request.get("api_key", ""))
            return web.json_response(RouterError("internal error").body(), status=500)
        finally:
            self._in_flight.discard(task)
            if not self._in_flight:
                self._idle.set()

    # ------------------------------------------------------------------ helpers
    async def _body(self, request: web.Request) -> bytes:
        """The raw body, at most max_body_bytes, within body_timeout_s."""
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"the request body exceeds {self.max_body_bytes} bytes",
                                  code="request_too_large") from None
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s") from None

    async def _off_loop(self, size: int, fn: Callable[[], T]) -> T:
        """Run `fn` here for small inputs, on a thread for large ones."""
        if size <= OFF_LOOP_BYTES:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._parser, functools.partial(_then_trim, fn))

    async def _timed(self, request: web.Request, prompt: list[int], sampling: Sampling, trace: Trace,
                     images: Sequence[PromptImage] = ()) -> AsyncGenerator[Delta, None]:
        """Run the pipeline, recording TTFT / TPOT / end-to-end latency and token counts. A request whose
        client hung up (its handler cancelled with the connection gone, or a stream write refused) is
        counted as CLIENT_CLOSED."""
        start = time.monotonic()
        first_at: float | None = None
        generated = 0
        status = "error"
        self.traces[trace.request_id] = trace
        if len(self.traces) > 1000:
            self.traces.pop(next(iter(self.traces)))
        try:
            async with contextlib.aclosing(self.pipeline.run(prompt, sampling, trace, images)) as deltas:
                async for delta in deltas:
                    if first_at is None and delta.token_ids:
                        first_at = time.monotonic()
                        self.metrics.first_token(first_at - start)
                    generated += len(delta.token_ids)
                    yield delta
            status = "ok"
        except RouterError as exc:  # the client's doing (400, 408 ...) or a refusal of ours (503)
            status = str(exc.status)
            raise
        except asyncio.CancelledError:  # aiohttp cancels the handler of a connection that was lost
            trace.client_gone = trace.client_gone or request.transport is None or request.transport.is_closing()
            raise
        finally:
            end = time.monotonic()
            if status == "error":  # a client that hung up is not a server error (nor a finished request)
                status = CLIENT_CLOSED if trace.client_gone else "503"
            self.metrics.finished(status, len(prompt), generated, end - start,
                                  None if first_at is None else end - first_at, key=trace.api_key)
            request[COUNTED] = True  # the error, if any, reaches _errors with its count taken

    async def _sse(self, request: web.Request, frames: AsyncIterator[bytes], trace: Trace,
                   events: Callable[[str], bytes] | None = None) -> web.StreamResponse:
        """Stream `frames`; with `events` (a plain stream of one choice: Responder.text_events), a step's
        text may go out on the fast path (`Straight`)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunked = response.headers.get("Transfer-Encoding") == "chunked"  # as aiohttp chose in prepare()
        straight = Straight(request.transport, chunked, events) \
            if events is not None and request.transport is not None and not response.compression else None
        reset = SINK.set(straight)
        try:
            await self._stream_events(response, frames, straight)
        except (ConnectionResetError, BrokenPipeError):  # also while writing the stream's ending
            trace.client_gone = True  # counted as CLIENT_CLOSED, not as an error of ours
        finally:
            SINK.reset(reset)
        return response  # a client that left: the closed stream cancels the workers' request

    async def _stream_events(self, response: web.StreamResponse, frames: AsyncIterator[bytes],
                             straight: Straight | None) -> None:
        """The events, then an error event if the stream failed, then `data: [DONE]`: what is left of
        the events, the error and [DONE] in one write."""
        tail: list[bytes] = []
        try:
            async with contextlib.aclosing(coalesced(frames, tail)) as writes:
                async for data in writes:
                    await response.write(data)
                    if straight is not None:
                        straight.open = True
        except RouterError as exc:
            tail.append(responses.frame(exc.body()))
        except asyncio.CancelledError:
            if not self.ending:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # ended by `_end_in_flight`: the client gets an error event, then [DONE]
            tail.append(responses.frame(SHUTTING_DOWN.body()))
        except (ConnectionResetError, BrokenPipeError):
            raise
        except Exception:
            logger.exception("Stream failed")
            tail.append(responses.frame(Unavailable("the request failed inside the serving system").body()))
        tail.append(b"data: [DONE]\n\n")
        await response.write_eof(b"".join(tail))

    # ------------------------------------------------------------------ routes
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prep = self.prepare
        async with self.admission.slot():
            req, grammar, plan = await self._off_loop(len(body), lambda: prep.parse_chat(body))
            loaded = await prep.load_images(req)
            prompt, images = await self._off_loop(len(body), lambda: prep.chat_tokens(req, loaded, plan))
            sampling = prep.sampling(req, len(prompt), grammar)
            respond = self._responder("chatcmpl", len(prompt))
            trace = Trace(respond.rid, api_key=request.get("api_key", ""))
            async with contextlib.aclosing(self._timed(request, prompt, sampling, trace, images)) as deltas:
                if req.stream:
                    chunks = respond.tool_chunks(deltas, req.n, req.include_usage, plan.known) if plan.parse else \
                        respond.chat_chunks(deltas, req.n, req.include_usage, req.logprobs_n)
                    plain = req.n == 1 and req.logprobs_n is None and not plan.parse
                    return await self._sse(request, chunks, trace, respond.text_events("chat") if plain else None)
                choices, cached = await self._collect(deltas, req.n)
            return web.json_response(respond.chat_body(choices, cached, req.logprobs_n, plan))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prep = self.prepare
        async with self.admission.slot():
            req, prompt, grammar = await self._off_loop(len(body), lambda: prep.completion_prompt(body))
            sampling = prep.sampling(req, len(prompt), grammar)
            echo = None
            if req.echo:
                text = req.prompt if isinstance(req.prompt, str) else "".join(map(self.token_texts.text, prompt))
                echo = responses.Prompt(text, prompt)
            respond = self._responder("cmpl", len(prompt))
            trace = Trace(respond.rid, api_key=request.get("api_key", ""))
            async with contextlib.aclosing(self._timed(request, prompt, sampling, trace)) as deltas:
                if req.stream:
                    chunks = respond.completion_chunks(deltas, req.n, req.include_usage, req.logprobs_n, echo,
                                                       req.score_only)
                    plain = req.n == 1 and req.logprobs_n is None and echo is None and not req.score_only
                    return await self._sse(request, chunks, trace,
                                           respond.text_events("completion") if plain else None)
                choices, cached = await self._collect(deltas, req.n, echo)
            return web.json_response(respond.completion_body(choices, cached, req.logprobs_n, echo, req.score_only))

    def _responder(self, prefix: str, prompt_tokens: int) -> responses.Responder:
        return responses.Responder(p.new_id(prefix), p.created(), self.model, self.token_texts, prompt_tokens)

    @staticmethod
    async def _collect(deltas: AsyncIterator[Delta], n: int, prompt: responses.Prompt | None = None,
                       ) -> tuple[list[responses.Collected], int]:
        try:
            return await responses.collect(deltas, n, prompt)
        except RouterError:
            raise
        except Exception as exc:  # a worker failure the pipeline could not absorb
            logger.exception("Request failed")
            raise Unavailable("the request failed inside the serving system") from exc

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "triphase",
             "max_model_len": self.max_model_len}]})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document(self.model))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        workers = self.pipeline.registry.snapshot()
        ready = not self.draining and any(w.available and w.role.can_decode for w in workers)
        body = {"ready": ready, "draining": self.draining, "model": self.model,
                "workers": [{"id": w.worker_id, "endpoint": w.endpoint, "role": str(w.role), "healthy": w.healthy}
                            for w in workers]}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        workers = self.pipeline.registry.snapshot()
        self.metrics.workers_seen([(w.role, "draining" if w.draining else "ready" if w.healthy else "unhealthy",
                                    w.waiting) for w in workers], self.admission.queued)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
