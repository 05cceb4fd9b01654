"""gRPC transport to the workers: channels, deadlines, and protobuf <-> router types.

Nothing above this module and worker_session.py (the Session that carries Generate and Decode) sees
protobuf, except that a prefill's KV transfer parameters are passed through opaquely (`KvTicket`):
the router moves metadata, the workers move the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.common import role_pb
from triphase.common.block_hash import ImageSpan
from triphase.common.roles import HANDED_OVER_METADATA, ROLE_METADATA, Role
from triphase.common.security import mtls
from triphase.common.worker_stubs import WorkerStubs
from triphase.router.errors import BadRequest
from triphase.router.policy.pairing import WorkerView
from triphase.router.worker_session import WorkerSession

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.keepalive_time_ms", 10_000)]


class WorkerFailed(Exception):
    """The worker could not serve the call (down, overloaded, refused): try elsewhere."""


class HandedOver(WorkerFailed):
    """The worker gave a running stream back (a role switch, a shutdown, load balancing): resume it
    elsewhere; the worker has not failed."""


class RoleRefused(WorkerFailed):
    """The worker's role does not allow the call: it switched roles since the router last heard. The
    worker is healthy; the router should see it as `role` and go elsewhere."""

    def __init__(self, message: str, role: Role) -> None:
        super().__init__(message)
        self.role = role


class HandOffFailed(WorkerFailed):
    """The decode worker could not obtain the prefilled KV (source gone, pin expired, incompatible
    layout); the decode worker itself is fine and can prefill locally."""


@dataclasses.dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per token; None: none
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    grammar: str = ""  # common/grammar.py
    n: int = 1  # choices: the worker computes the prompt once and forks them
    prompt_logprobs: int | None = None  # top-N logprobs of the prompt's tokens, on the first delta

    def to_pb(self) -> pb.SamplingParams:
        p = pb.SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=list(self.stop), ignore_eos=self.ignore_eos,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, min_p=self.min_p,
                              logit_bias=dict(self.logit_bias), min_tokens=self.min_tokens,
                              stop_token_ids=list(self.stop_token_ids), grammar=self.grammar, n=self.n)
        if self.seed is not None:
            p.seed = self.seed
        if self.logprobs is not None:
            p.logprobs = self.logprobs
        if self.prompt_logprobs is not None:
            p.prompt_logprobs = self.prompt_logprobs
        return p


@dataclasses.dataclass
class PromptImage:
    """One image of a prompt: its placeholder run, digest and bytes, and (once an encode worker has
    encoded it) that worker's endpoint, where the prefill worker reads the embeddings."""

    offset: int
    length: int
    digest: bytes
    data: bytes
    source: str = ""
    slot: Any = None  # pb.EmbeddingsSlot on the source, for a NIXL READ; opaque above this module
    ticket: Any = None  # pb.Ticket: the source's signature over source and slot; opaque likewise

    @property
    def span(self) -> ImageSpan:
        return ImageSpan(self.offset, self.length, self.digest)

    def to_pb(self, *, with_data: bool = True) -> pb.PromptImage:
        """With the bytes (the worker may have to encode it) or the span and digest only (a Decode)."""
        if not with_data:
            return pb.PromptImage(offset=self.offset, length=self.length, digest=self.digest)
        return pb.PromptImage(offset=self.offset, length=self.length, digest=self.digest, data=self.data,
                              source_endpoint=self.source, slot=self.slot, ticket=self.ticket)


@dataclasses.dataclass(slots=True)
class Delta:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    kv_backend: str = ""  # first delta of a Decode: how the KV arrived
    # per token of token_ids, with logprobs asked: {token id: logprob}, the chosen token first, then the top-N
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    index: int = 0  # the choice this delta belongs to
    prompt_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)  # first delta: per prompt token
    delivered: bool = False  # the client already has these tokens' text (worker_session.SINK): count, don't send


@dataclasses.dataclass
class KvTicket:
    """A prefilled request's KV, pinned on `source`; opaque to everything but this module."""

    source: str
    params: Any  # pb.KvTransferParams
    num_blocks: int
    nbytes: int


def _delta(d: pb.TokenDelta) -> Delta:
    return Delta(list(d.token_ids), d.text, FINISH.get(d.finish_reason), d.prompt_tokens, d.cached_tokens,
                 d.kv_backend, _rows(d.logprobs) if d.logprobs else [], d.index,
                 _rows(d.prompt_logprobs) if d.prompt_logprobs else [])


def _delivered(token_ids: list[int]) -> Delta:
    return Delta(token_ids, "", delivered=True)


def _rows(rows: Any) -> list[dict[int, float]]:
    return [{e.token_id: e.logprob for e in row.entries} for row in rows]


def _failure(exc: grpc.aio.AioRpcError) -> Exception:
    metadata = dict(exc.trailing_metadata() or ())
    return _status_failure(exc.code(), exc.details() or "", HANDED_OVER_METADATA in metadata,
                           metadata.get(ROLE_METADATA))


def _stream_failure(error: pb.StreamError) -> Exception:
    """How one stream of a Session ended, as `_failure` maps the same status of a call."""
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    role = role_pb.from_pb(error.role) if error.role != pb.ROLE_UNSPECIFIED else None
    return _status_failure(code, error.message, error.handed_over, role)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status_failure(code: grpc.StatusCode, details: str, handed_over: bool, role: str | None) -> Exception:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest(details or "invalid request")
    if code == grpc.StatusCode.ABORTED:
        return HandOffFailed(details or "KV hand-off failed")
    if code == grpc.StatusCode.UNAVAILABLE and handed_over:
        return HandedOver(details or "handed over")
    if code == grpc.StatusCode.FAILED_PRECONDITION and role in set(Role):
        return RoleRefused(f"{code.name}: {details}", Role(role))
    return WorkerFailed(f"{code.name}: {details}")


class WorkerClient:
    """`bundle`: the router's mTLS certificate and the deployment's CA (common/security/mtls.py); None: plaintext.
    Generate and Decode travel on one Session per worker (worker_session.py); the rest are calls."""

    def __init__(self, *, timeout_s: float = 600.0, bundle: mtls.Bundle | None = None) -> None:
        self.timeout_s = timeout_s
        self._stubs = WorkerStubs(bundle, OPTIONS)
        self._stub = self._stubs.stub
        self._sessions: dict[str, WorkerSession[Delta]] = {}

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(session.close() for session in sessions))
        await self._stubs.close()

    def _session(self, endpoint: str) -> WorkerSession[Delta]:
        """The endpoint's session: a new one when it has none, its last one failed, or its channel changed
        (a certificate rotation: the old one closes after its last stream)."""
        stub = self._stub(endpoint)
        session = self._sessions.get(endpoint)
        if session is None or session.closed is not None or session.stub is not stub:
            if session is not None:
                session.retire()
            session = self._sessions[endpoint] = WorkerSession(stub, _delta, _delivered, _stream_failure,
                                                               timeout_s=self.timeout_s)
        return session

    def generate(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                 resumed_output_tokens: int = 0, images: Sequence[PromptImage] = (),
                 ) -> AsyncGenerator[Delta, None]:
        return self._session(endpoint).deltas("generate", pb.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling.to_pb(),
            resumed_output_tokens=resumed_output_tokens, images=[i.to_pb() for i in images]))

    async def prefill(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
                      images: Sequence[PromptImage] = ()) -> tuple[KvTicket, Delta]:
        try:
            response = await self._stub(endpoint).Prefill(
                pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling.to_pb(),
                                  images=[i.to_pb() for i in images]),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc) from None
        kv = response.kv
        ticket = KvTicket(endpoint, kv, len(kv.block_ids), len(kv.block_ids) * kv.layout.block_bytes)
        return ticket, _delta(response.first)

    def decode(self, endpoint: str, request_id: str, prompt: list[int], sampling: Sampling,
               ticket: KvTicket, images: Sequence[PromptImage] = ()) -> AsyncGenerator[Delta, None]:
        return self._session(endpoint).deltas("decode", pb.DecodeRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling.to_pb(), kv=ticket.params,
            images=[i.to_pb(with_data=False) for i in images]))

    async def encode(self, endpoint: str, data: bytes) -> tuple[bytes, Any, Any]:
        """Have an encode worker encode (and keep) one image; returns its digest, where the worker keeps
        the embeddings (None without NIXL) and its ticket for them (None without one); both opaque,
        passed on to the prefill worker."""
        try:
            response = await self._stub(endpoint).Encode(pb.EncodeRequest(data=data), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc) from None
        return (bytes(response.digest), response.slot if response.HasField("slot") else None,
                response.ticket if response.HasField("ticket") else None)

    async def release(self, ticket: KvTicket) -> None:
        # On failure the source still frees pinned KV after its timeout.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub(ticket.source).ReleaseKv(
                pb.ReleaseKvRequest(request_id=ticket.params.request_id, kv=ticket.params), timeout=10)

    async def hand_over(self, endpoint: str, streams: int, max_context_tokens: int, min_new_tokens: int) -> int:
        """Ask a decode worker to end up to `streams` streams for the router to resume elsewhere."""
        try:
            response = await self._stub(endpoint).HandOver(
                pb.HandOverRequest(streams=streams, max_context_tokens=max_context_tokens,
                                   min_new_tokens=min_new_tokens), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise WorkerFailed(f"{endpoint}: {exc.code().name}") from None
        return int(response.handed_over)

    async def watch(self, endpoint: str, interval_s: float = 0.5) -> AsyncIterator[WorkerView]:
        call = self._stub(endpoint).WatchStats(pb.WatchStatsRequest(interval_seconds=interval_s))
        try:
            async for s in call:
                yield WorkerView(
                    worker_id=s.worker_id, endpoint=endpoint, role=role_pb.from_pb(s.role), healthy=True,
                    draining=s.draining or s.switching, running=s.running_requests, waiting=s.waiting_requests,
                    free_blocks=s.free_kv_blocks, total_blocks=max(1, s.total_kv_blocks),
                    queued_prefill_tokens=s.queued_prefill_tokens, block_size=s.block_size or 16,
                    cached_hashes=frozenset(s.cached_block_hashes),
                )
        except grpc.aio.AioRpcError as exc:
            raise WorkerFailed(f"{endpoint}: {exc.code().name}") from None
        finally:
            call.cancel()
