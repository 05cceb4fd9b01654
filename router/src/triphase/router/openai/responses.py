"""OpenAI response bodies and server-sent event chunks, from the pipeline's deltas.

A request with n choices gets deltas tagged by `index`; a body collects each choice, a stream sends each
delta as a chunk of its choice as it comes (the choices interleave, as OpenAI's do). A chunk is one
frame per delta: the per-token frames are assembled from bytes encoded once per stream and choice
(`frame_head`) with only the token's own fields encoded each time, the same JSON `frame` would give.

Three streams: chat (content, logprobs), chat whose output may hold tool calls (tools.py: content
held back while it may open a call tag, each call sent as OpenAI's two deltas) and completions (text,
the echoed prompt, logprobs with text offsets). Usage, when asked for, is the last chunk. A
`delivered` delta's text was already written by the per-step fast path (`text_events`, routes.py's
`Straight`): it counts toward usage and sends nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from triphase.router.openai import logprobs as lp
from triphase.router.openai import protocol as p
from triphase.router.openai import tools
from triphase.router.worker_client import Delta

TAIL = b"}]}\n\n"


def frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def frame_head(base: dict[str, Any], index: int = 0) -> bytes:
    """`data: {...base, "choices": [{"index": i, ` — a chunk's fields follow, then TAIL."""
    return b"data: " + json.dumps(base)[:-1].encode() + b', "choices": [{"index": ' + str(index).encode() + b", "


def json_reason(reason: str | None) -> bytes:
    return b"null" if reason is None else json.dumps(reason).encode()


def chat_event(head: bytes, text: str, reason: str | None = None) -> bytes:
    """A chat chunk of `text` (none: an empty delta) after `frame_head`."""
    content = b'{"content": ' + json.dumps(text).encode() + b"}" if text else b"{}"
    return head + b'"delta": ' + content + b', "finish_reason": ' + json_reason(reason) + TAIL


def completion_event(head: bytes, text: str, reason: str | None = None) -> bytes:
    """A completion chunk of `text` without logprobs after `frame_head`."""
    return head + b'"text": ' + json.dumps(text).encode() + b', "finish_reason": ' + json_reason(reason) + \
        b', "logprobs": null' + TAIL


@dataclasses.dataclass
class Collected:
    """One choice of a non-streamed completion."""

    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    reason: str = "stop"
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Prompt:
    """What a completion echoes: the prompt's text and tokens, and their logprobs when they were asked for."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)  # filled by the first delta


async def collect(deltas: AsyncIterator[Delta], n: int, prompt: Prompt | None = None) -> tuple[list[Collected], int]:
    """Every choice of a request, in index order, and the prompt tokens found in the prefix cache;
    `prompt` gets the prompt's logprobs."""
    choices = [Collected() for _ in range(n)]
    pieces: list[list[str]] = [[] for _ in range(n)]
    cached = 0
    async for d in deltas:
        if prompt is not None and d.prompt_logprobs and not prompt.logprobs:
            prompt.logprobs = d.prompt_logprobs
        choice = choices[d.index]
        pieces[d.index].append(d.text)
        choice.tokens.extend(d.token_ids)
        choice.logprobs.extend(d.logprobs)
        cached = cached or d.cached_tokens
        if d.finish_reason:
            choice.reason = d.finish_reason
    for choice, text in zip(choices, pieces, strict=True):
        choice.text = "".join(text)
    return choices, cached


@dataclasses.dataclass
class Responder:
    """Builds one request's response: its id, model name, creation time and how tokens read as text."""

    rid: str
    created: int
    model: str
    texts: lp.TokenTexts
    prompt_tokens: int
    # `frame_head` per (chunk object, choice): the streams' and the fast path's events share them
    _heads: dict[tuple[str, int], bytes] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def _usage(self, choices: list[Collected], cached: int) -> dict[str, Any]:
        return p.usage(self.prompt_tokens, sum(len(c.tokens) for c in choices), cached)

    # ---------------------------------------------------------------- bodies
    def chat_body(self, choices: list[Collected], cached: int, logprobs_n: int | None,
                  plan: tools.Plan) -> dict[str, Any]:
        out = []
        for index, c in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            reason = c.reason
            if plan.parse:
                content, calls = tools.parse(c.text, plan.known)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": [x.body() for x in calls]}
                    reason = "tool_calls" if reason == "stop" else reason
            logprobs = None if logprobs_n is None else \
                {"content": lp.chat_entries(self.texts, c.tokens, c.logprobs, logprobs_n)}
            out.append({"index": index, "message": message, "finish_reason": reason, "logprobs": logprobs})
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": out, "usage": self._usage(choices, cached)}

    def completion_body(self, choices: list[Collected], cached: int, logprobs_n: int | None,
                        echo: Prompt | None, score_only: bool = False) -> dict[str, Any]:
        """`echo`: the prompt to put before each choice's text; `score_only`: the choices' own tokens left
        out (max_tokens 0: the workers drew one, which nobody asked for)."""
        if score_only:
            choices = [Collected(reason="length") for _ in choices]
        out = []
        for index, c in enumerate(choices):
            logprobs = None
            if logprobs_n is not None:
                builder = lp.CompletionLogprobs(self.texts, logprobs_n)
                parts = [builder.add_prompt(echo.token_ids, echo.logprobs)] if echo and echo.logprobs else []
                logprobs = lp.merge([*parts, builder.add(c.tokens, c.logprobs)])
            out.append({"index": index, "text": (echo.text if echo else "") + c.text, "finish_reason": c.reason,
                        "logprobs": logprobs})
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": out, "usage": self._usage(choices, cached)}

    # ---------------------------------------------------------------- streams
    def _head(self, kind: str, index: int = 0) -> bytes:
        head = self._heads.get((kind, index))
        if head is None:
            head = self._heads[(kind, index)] = frame_head(self._base(kind), index)
        return head

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def _usage_frame(self, base: dict[str, Any], generated: int) -> bytes:
        return frame({**base, "choices": [], "usage": p.usage(self.prompt_tokens, generated)})

    def text_events(self, kind: str) -> Callable[[str], bytes]:
        """The event of a step's text of choice 0 (no finish, no logprobs) in `chat_chunks` ("chat") or
        `completion_chunks` ("completion"): what worker_session.SINK writes."""
        if kind == "chat":
            return functools.partial(chat_event, self._head("chat.completion.chunk"))
        return functools.partial(completion_event, self._head("text_completion"))

    async def chat_chunks(self, deltas: AsyncIterator[Delta], n: int, include_usage: bool,
                          logprobs_n: int | None) -> AsyncIterator[bytes]:
        base = self._base("chat.completion.chunk")
        heads = [self._head("chat.completion.chunk", i) for i in range(n)]
        for i in range(n):
            yield frame({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        generated = 0
        async for d in deltas:
            generated += len(d.token_ids)
            if d.delivered:
                continue
            head = heads[d.index]
            if logprobs_n is not None and d.token_ids:  # every token's logprobs, even one with no text yet
                entries = lp.chat_entries(self.texts, d.token_ids, d.logprobs, logprobs_n)
                content = b'{"content": ' + json.dumps(d.text).encode() + b"}"
                yield (head + b'"delta": ' + content + b', "logprobs": ' + json.dumps({"content": entries}).encode()
                       + b', "finish_reason": ' + json_reason(d.finish_reason) + TAIL)
            elif d.text or d.finish_reason:
                yield chat_event(head, d.text, d.finish_reason)
        if include_usage:
            yield self._usage_frame(base, generated)

    async def tool_chunks(self, deltas: AsyncIterator[Delta], n: int, include_usage: bool,
                          known: set[str]) -> AsyncIterator[bytes]:
        """Chat chunks of a request whose output may hold tool calls: content as it is known not to be
        a call, each call as two deltas once complete, `tool_calls` as the choice's finish reason."""
        base = self._base("chat.completion.chunk")

        def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> bytes:
            return frame({**base, "choices": [{"index": index, "delta": delta, "finish_reason": reason}]})

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        parsers = [tools.StreamParser(known) for _ in range(n)]
        generated = 0
        async for d in deltas:
            generated += len(d.token_ids)
            if d.delivered:  # (no sink serves a stream whose text may hold calls: nothing to parse)
                continue
            parser = parsers[d.index]
            text, calls = parser.feed(d.text)
            if d.finish_reason:
                text += parser.flush()
            if text:
                yield chunk(d.index, {"content": text})
            for k, call in enumerate(calls):
                at = parser.calls - len(calls) + k
                yield chunk(d.index, {"tool_calls": [{"index": at, "id": call.id, "type": "function",
                                                      "function": {"name": call.name, "arguments": ""}}]})
                yield chunk(d.index, {"tool_calls": [{"index": at, "function": {"arguments": call.arguments}}]})
            if d.finish_reason:
                yield chunk(d.index, {}, "tool_calls" if parser.calls and d.finish_reason == "stop" else
                            d.finish_reason)
        if include_usage:
            yield self._usage_frame(base, generated)

    async def completion_chunks(self, deltas: AsyncIterator[Delta], n: int, include_usage: bool,
                                logprobs_n: int | None, echo: Prompt | None,
                                score_only: bool = False) -> AsyncIterator[bytes]:
        """The echoed prompt (with its logprobs: they come with the first delta) is each choice's first
        chunk; with `score_only` it is all there is (and a `length` finish)."""
        base = self._base("text_completion")
        heads = [self._head("text_completion", i) for i in range(n)]
        generated = 0
        logprobs = None if logprobs_n is None else [lp.CompletionLogprobs(self.texts, logprobs_n) for _ in range(n)]
        echoed = echo is None
        async for d in deltas:
            if not echoed and echo is not None:
                echoed = True
                for i in range(n):
                    prompt_lp = logprobs[i].add_prompt(echo.token_ids, d.prompt_logprobs) \
                        if logprobs is not None and d.prompt_logprobs else None
                    yield frame({**base, "choices": [{"index": i, "text": echo.text, "finish_reason": None,
                                                      "logprobs": prompt_lp}]})
            if score_only:
                if d.finish_reason:
                    yield frame({**base, "choices": [{"index": d.index, "text": "", "finish_reason": "length",
                                                      "logprobs": None}]})
                continue
            generated += len(d.token_ids)
            if d.delivered:
                continue
            head = heads[d.index]
            if logprobs is not None and d.token_ids:
                yield (head + b'"text": ' + json.dumps(d.text).encode() + b', "finish_reason": '
                       + json_reason(d.finish_reason) + b', "logprobs": '
                       + json.dumps(logprobs[d.index].add(d.token_ids, d.logprobs)).encode() + TAIL)
            elif d.text or d.finish_reason:
                yield completion_event(head, d.text, d.finish_reason)
        if include_usage:
            yield self._usage_frame(base, generated)
