"""HTTP routes of the OpenAI-compatible API (aiohttp): the only module that knows the web framework.

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
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from triphase.common.images import ImageLimits
from triphase.common.tokenizer import ImageSlot, Tokenizer
from triphase.common.vision import VisionConfig
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
from triphase.router.openai import tools
from triphase.router.openai.images import ImageSources, LoadedImage
from triphase.router.openai.images import load as load_image
from triphase.router.openai.openapi import document
from triphase.router.openai.structured import grammar_for
from triphase.router.pipeline import Pipeline, Trace
from triphase.router.worker_client import Delta, PromptImage, Sampling

logger = logging.getLogger(__name__)
T = TypeVar("T")
END_S = 5.0  # at the drain deadline: how long the requests still running get to write their ending
SHUTTING_DOWN = Unavailable("the server is shutting down and could not finish this request; retry it")
OFF_LOOP_BYTES = 64 << 10  # bodies larger than this are parsed and tokenized on the parsing thread
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: maybe a lone surrogate

# ---- SSE frames. A stream sends one frame per token, so the per-token frames are assembled from
# bytes encoded once per stream (`_frame_head`) and only the token's own fields are encoded each time;
# the result is the same JSON `_frame` would produce.
TAIL = b"}]}\n\n"


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _frame_head(base: dict[str, Any]) -> bytes:
    """`data: {...base, "choices": [{"index": 0, ` — a chunk's fields follow, then TAIL."""
    return b"data: " + json.dumps(base)[:-1].encode() + b', "choices": [{"index": 0, '


def _json_reason(reason: str | None) -> bytes:
    return b"null" if reason is None else json.dumps(reason).encode()


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


@dataclasses.dataclass
class Collected:
    """A whole (non-streamed) completion."""

    text: str
    tokens: list[int]
    reason: str
    cached: int
    logprobs: list[dict[int, float]]


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
        self.vision = vision  # the model's image settings; None: it takes no images
        self.image_sources = image_sources or ImageSources(ImageLimits())
        self.tokenizer = tokenizer
        self.token_texts = lp.TokenTexts(tokenizer)
        self.metrics = metrics
        self.model = model
        self.max_model_len = max_model_len
        self.admission = admission or Admission(max_in_flight=256, max_queued=1024)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        # No prompt of more bytes than this fits the context: each token stands for at most this many.
        self.max_prompt_bytes = max_model_len * tokenizer.max_token_bytes
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

    @staticmethod
    def _parse_json(body: bytes) -> Any:
        try:
            value = json.loads(body)
            if _SURROGATE_ESCAPE.search(body):  # valid pairs decode to one character; lone ones cannot be encoded
                json.dumps(value, ensure_ascii=False).encode()
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            reason = "nested too deeply" if isinstance(exc, RecursionError) else \
                "has a lone UTF-16 surrogate" if isinstance(exc, UnicodeEncodeError) else \
                f"is not valid JSON ({exc})"
            raise BadRequest(f"the request body {reason}", code="invalid_json") from None
        return value

    def _check_text_size(self, text_bytes: int, param: str) -> None:
        if text_bytes > self.max_prompt_bytes:
            raise BadRequest(f"the prompt ({text_bytes} bytes) cannot fit this model's context length "
                             f"{self.max_model_len}", param=param, code="context_length_exceeded")

    def _parse_chat(self, body: bytes) -> tuple[p.ChatCompletionRequest, str, tools.Plan]:
        """The request, the grammar its output must follow ("" for none) and how its tools are used."""
        req: p.ChatCompletionRequest = p.parse(p.ChatCompletionRequest, self._parse_json(body))
        self._check_model(req)  # before the costly part
        self._check_text_size(sum(len(m.text().encode()) for m in req.messages), "messages")
        count = sum(len(m.images) for m in req.messages)
        if count and self.vision is None:
            raise BadRequest(f"the model `{self.model}` does not take images", param="messages",
                             code="invalid_image")
        if count > self.image_sources.limits.max_images:
            raise BadRequest(f"{count} images; at most {self.image_sources.limits.max_images} per request",
                             param="messages", code="invalid_image")
        plan = tools.plan(req, self.tokenizer.renders_tools)
        grammar = grammar_for(req)
        if plan.constrained and grammar:
            raise BadRequest("a required or named tool call cannot be combined with a response format",
                             param="tool_choice")
        return req, plan.grammar or grammar, plan

    async def _load_images(self, req: p.ChatCompletionRequest) -> list[LoadedImage]:
        """The request's images in order, fetched and checked at once (a 400 names the first bad one)."""
        places = [(f"messages.{i}.content.{j}.image_url", part.image_url.url)
                  for i, m in enumerate(req.messages) if isinstance(m.content, list)
                  for j, part in enumerate(m.content) if isinstance(part, p.ImagePart)]
        return list(await asyncio.gather(*(load_image(url, self.image_sources, param) for param, url in places)))

    def _chat_tokens(self, req: p.ChatCompletionRequest, loaded: list[LoadedImage], plan: tools.Plan,
                     ) -> tuple[list[int], list[PromptImage]]:
        try:
            if not loaded:
                return self.tokenizer.encode_chat(plan.rows, plan.template_tools), []
            assert self.vision is not None  # _parse_chat refused images otherwise
            slot = ImageSlot(self.vision.image_token_id, self.vision.tokens_per_image)
            messages = [dict(row) for row in plan.rows]
            for i, m in enumerate(req.messages):
                if isinstance(m.content, list):
                    messages[i + plan.offset]["content"] = [
                        part.text if isinstance(part, p.TextPart) else slot for part in m.content]
            ids, offsets = self.tokenizer.encode_chat_with_images(messages, plan.template_tools)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        return ids, [PromptImage(at, slot.count, image.digest, image.data)
                     for at, image in zip(offsets, loaded, strict=True)]

    def _completion_prompt(self, body: bytes) -> tuple[p.CompletionRequest, list[int], str]:
        req = p.parse(p.CompletionRequest, self._parse_json(body))
        self._check_model(req)
        if req.echo and req.logprobs is not None:
            raise BadRequest("`echo` with `logprobs` (prompt logprobs) is not supported yet", param="echo",
                             code="unsupported_parameter")
        if isinstance(req.prompt, str):
            self._check_text_size(len(req.prompt.encode()), "prompt")
            prompt = self.tokenizer.encode(req.prompt)
        else:
            if len(req.prompt) >= self.max_model_len:
                raise BadRequest(f"the prompt has {len(req.prompt)} tokens; this model's context length is "
                                 f"{self.max_model_len}", param="prompt", code="context_length_exceeded")
            vocab = self.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt):
                raise BadRequest(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            prompt = list(req.prompt)
        if not prompt:
            raise BadRequest("the prompt is empty", param="prompt")
        return req, prompt, grammar_for(req)

    def _check_model(self, req: p.SamplingFields) -> None:
        if req.model != self.model:
            raise BadRequest(f"the model `{req.model}` does not exist; this server serves `{self.model}`",
                             param="model", code="model_not_found")

    def _sampling(self, req: p.ChatCompletionRequest | p.CompletionRequest, prompt_len: int,
                  default_max: int | None, prompt_param: str, grammar: str) -> Sampling:
        """`prompt_param`: the field that holds the prompt (`messages` or `prompt`), named when it is too long."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise BadRequest(f"the prompt has {prompt_len} tokens; this model's context length is "
                             f"{self.max_model_len}", param=prompt_param, code="context_length_exceeded")
        limit = req.limit or min(default_max or room, room)
        if limit > room:
            raise BadRequest(f"max_tokens ({limit}) plus the prompt ({prompt_len} tokens) exceeds the context "
                             f"length {self.max_model_len}", param="max_tokens", code="context_length_exceeded")
        if req.min_tokens > limit:
            raise BadRequest(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({limit})", param="min_tokens")
        vocab = self.tokenizer.vocab_size
        bias = req.bias
        for param, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", req.stop_token_ids or [])):
            if any(t >= vocab for t in ids):
                raise BadRequest(f"{param}: token ids must be in 0..{vocab - 1}", param=param)
        return Sampling(max_tokens=limit, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        seed=req.seed, stop=tuple(req.stop_list), ignore_eos=req.ignore_eos,
                        logprobs=req.logprobs_n, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                        min_p=req.min_p, logit_bias=bias, min_tokens=req.min_tokens,
                        stop_token_ids=tuple(req.stop_token_ids or ()), grammar=grammar)

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
        except BadRequest:
            status = "400"
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

    async def _collect(self, deltas: AsyncIterator[Delta]) -> Collected:
        text, tokens, reason, cached, logprobs = [], [], "stop", 0, []
        try:
            async for d in deltas:
                text.append(d.text)
                tokens.extend(d.token_ids)
                logprobs.extend(d.logprobs)
                cached = cached or d.cached_tokens
                if d.finish_reason:
                    reason = d.finish_reason
        except RouterError:
            raise
        except Exception as exc:  # a worker failure the pipeline could not absorb
            logger.exception("Request failed")
            raise Unavailable("the request failed inside the serving system") from exc
        return Collected("".join(text), tokens, reason, cached, logprobs)

    async def _sse(self, request: web.Request, frames: AsyncIterator[bytes], trace: Trace) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async for frame in frames:
                await response.write(frame)
        except RouterError as exc:
            await response.write(_frame(exc.body()))
        except asyncio.CancelledError:
            if not self.ending:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # ended by `_end_in_flight`: the client gets an error event, then [DONE]
            await response.write(_frame(SHUTTING_DOWN.body()))
        except (ConnectionResetError, BrokenPipeError):
            trace.client_gone = True  # counted as CLIENT_CLOSED, not as an error of ours
            return response  # the client left: the closed stream cancels the workers' request
        except Exception:
            logger.exception("Stream failed")
            await response.write(_frame(Unavailable("the request failed inside the serving system").body()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ routes
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        async with self.admission.slot():
            req, grammar, plan = await self._off_loop(len(body), lambda: self._parse_chat(body))
            loaded = await self._load_images(req)
            prompt, images = await self._off_loop(len(body), lambda: self._chat_tokens(req, loaded, plan))
            sampling = self._sampling(req, len(prompt), None, "messages", grammar)
            return await self._chat(request, req, prompt, sampling, images, plan)

    async def _chat(self, request: web.Request, req: p.ChatCompletionRequest, prompt: list[int],
                    sampling: Sampling, images: list[PromptImage], plan: tools.Plan) -> web.StreamResponse:
        rid, created = p.new_id("chatcmpl"), p.created()
        trace = Trace(rid, api_key=request.get("api_key", ""))
        async with contextlib.aclosing(self._timed(request, prompt, sampling, trace, images)) as deltas:
            if req.stream:
                chunks = self._tool_chunks(deltas, rid, created, len(prompt), req.include_usage, plan.known) \
                    if plan.parse else \
                    self._chat_chunks(deltas, rid, created, len(prompt), req.include_usage, req.logprobs_n)
                return await self._sse(request, chunks, trace)
            done = await self._collect(deltas)
        logprobs = None if req.logprobs_n is None else \
            {"content": lp.chat_entries(self.token_texts, done.tokens, done.logprobs, req.logprobs_n)}
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        reason = done.reason
        if plan.parse:
            content, calls = tools.parse(done.text, plan.known)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [c.body() for c in calls]}
                reason = "tool_calls" if reason == "stop" else reason
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": logprobs}],
            "usage": p.usage(len(prompt), len(done.tokens), done.cached),
        })

    async def _tool_chunks(self, deltas: AsyncIterator[Delta], rid: str, created: int, prompt_tokens: int,
                           include_usage: bool, known: set[str]) -> AsyncIterator[bytes]:
        """Chat chunks of a request whose output may hold tool calls (tools.py): content as it is known
        not to be a call, each call as two deltas once complete, `tool_calls` as the finish reason."""
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}

        def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
            return _frame({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})

        yield chunk({"role": "assistant", "content": ""})
        parser = tools.StreamParser(known)
        generated, reason = 0, None
        async for d in deltas:
            generated += len(d.token_ids)
            reason = d.finish_reason or reason
            text, calls = parser.feed(d.text)
            if d.finish_reason:
                text += parser.flush()
            if text:
                yield chunk({"content": text})
            for call in calls:
                index = parser.calls - len(calls) + calls.index(call)
                yield chunk({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}]})
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
        yield chunk({}, "tool_calls" if parser.calls and reason == "stop" else reason or "stop")
        if include_usage:
            yield _frame({**base, "choices": [], "usage": p.usage(prompt_tokens, generated)})

    async def _chat_chunks(self, deltas: AsyncIterator[Delta], rid: str, created: int, prompt_tokens: int,
                           include_usage: bool, logprobs_n: int | None) -> AsyncIterator[bytes]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}
        yield _frame({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
        head = _frame_head(base)
        generated = 0
        async for d in deltas:
            generated += len(d.token_ids)
            if logprobs_n is not None and d.token_ids:  # every token's logprobs, even one with no text yet
                entries = lp.chat_entries(self.token_texts, d.token_ids, d.logprobs, logprobs_n)
                content = b'{"content": ' + json.dumps(d.text).encode() + b"}"
                yield (head + b'"delta": ' + content + b', "logprobs": ' + json.dumps({"content": entries}).encode()
                       + b', "finish_reason": ' + _json_reason(d.finish_reason) + TAIL)
            elif d.text or d.finish_reason:
                content = b'{"content": ' + json.dumps(d.text).encode() + b"}" if d.text else b"{}"
                yield head + b'"delta": ' + content + b', "finish_reason": ' + _json_reason(d.finish_reason) + TAIL
        if include_usage:
            yield _frame({**base, "choices": [], "usage": p.usage(prompt_tokens, generated)})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        async with self.admission.slot():
            req, prompt, grammar = await self._off_loop(len(body), lambda: self._completion_prompt(body))
            sampling = self._sampling(req, len(prompt), 16, "prompt", grammar)
            return await self._completions(request, req, prompt, sampling)

    async def _completions(self, request: web.Request, req: p.CompletionRequest, prompt: list[int],
                           sampling: Sampling) -> web.StreamResponse:
        rid, created = p.new_id("cmpl"), p.created()
        echo = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        trace = Trace(rid, api_key=request.get("api_key", ""))
        async with contextlib.aclosing(self._timed(request, prompt, sampling, trace)) as deltas:
            if req.stream:
                chunks = self._completion_chunks(deltas, rid, created, echo, len(prompt), req.include_usage,
                                                 req.logprobs_n)
                return await self._sse(request, chunks, trace)
            done = await self._collect(deltas)
        logprobs = None if req.logprobs_n is None else \
            lp.CompletionLogprobs(self.token_texts, req.logprobs_n).add(done.tokens, done.logprobs)
        return web.json_response({
            "id": rid, "object": "text_completion", "created": created, "model": self.model,
            "choices": [{"index": 0, "text": echo + done.text, "finish_reason": done.reason, "logprobs": logprobs}],
            "usage": p.usage(len(prompt), len(done.tokens), done.cached),
        })

    async def _completion_chunks(self, deltas: AsyncIterator[Delta], rid: str, created: int, echo: str,
                                 prompt_tokens: int, include_usage: bool, logprobs_n: int | None,
                                 ) -> AsyncIterator[bytes]:
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model}
        if echo:
            yield _frame({**base, "choices": [{"index": 0, "text": echo, "finish_reason": None, "logprobs": None}]})
        head = _frame_head(base)
        generated = 0
        logprobs = None if logprobs_n is None else lp.CompletionLogprobs(self.token_texts, logprobs_n)
        async for d in deltas:
            generated += len(d.token_ids)
            if logprobs is not None and d.token_ids:
                yield (head + b'"text": ' + json.dumps(d.text).encode() + b', "finish_reason": '
                       + _json_reason(d.finish_reason) + b', "logprobs": '
                       + json.dumps(logprobs.add(d.token_ids, d.logprobs)).encode() + TAIL)
            elif d.text or d.finish_reason:
                yield (head + b'"text": ' + json.dumps(d.text).encode() + b', "finish_reason": '
                       + _json_reason(d.finish_reason) + b', "logprobs": null' + TAIL)
        if include_usage:
            yield _frame({**base, "choices": [], "usage": p.usage(prompt_tokens, generated)})

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
