"""The gRPC WorkerService around the engine: protobuf <-> engine types and status codes.

This is the only module that converts between protobuf messages and engine types; the role and
admission state lives in roles.py, the decode side of the KV hand-off in kv/handoff.py, the router's
Session (contract v2: its streams over one gRPC stream, one message per engine step) in session.py.
Errors become the gRPC status codes of status.py, for a call or for one stream of a Session, and
PERMISSION_DENIED when the caller's certificate does not allow the method (authz.py). Numbers a
caller controls are bounded here or in SamplingParams before any work is done on them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common import role_pb
from triphase.common.images import ImageLimits
from triphase.common.roles import Role
from triphase.common.sampling import DEFAULT_MAX_TOKENS
from triphase.common.security import mtls
from triphase.common.worker_stubs import WorkerStubs
from triphase.workers.authz import refusal
from triphase.workers.engine.async_engine import AsyncEngine
from triphase.workers.engine.core import KvExport, RequestOutput
from triphase.workers.engine.kv_cache_manager import cdiv
from triphase.workers.engine.kv_layout import KvLayout
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.images import ImageService
from triphase.workers.kv import grpc_stream
from triphase.workers.kv.handoff import KvHandOff
from triphase.workers.kv.nixl import NixlConnector
from triphase.workers.lifecycle import Health
from triphase.workers.roles import HandedOver, Refused, RoleState
from triphase.workers.session import Malformed, Session
from triphase.workers.signing import Signer, TicketRefused
from triphase.workers.status import status_of

logger = logging.getLogger(__name__)

FINISH_TO_PB = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


STATS_COALESCE_S = 0.05  # WatchStats sends at most one update per this many seconds
STATS_INTERVAL_S = (0.05, 60.0)  # WatchStats interval_seconds is clamped to this range (default 1)
MAX_GRACE_S = 3600.0  # SetRole grace_seconds is clamped to [0, this] (default 30)
MAX_HAND_OVER = 1024  # HandOver streams is clamped to this


def clamp(value: float, low: float, high: float, default: float) -> float:
    """`value` within [low, high]; `default` for NaN or infinity."""
    return min(max(value, low), high) if math.isfinite(value) else default


def sampling_from_pb(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens or DEFAULT_MAX_TOKENS, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos, logprobs=p.logprobs if p.HasField("logprobs") else None,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty or 1.0, min_p=p.min_p, logit_bias=tuple(sorted(p.logit_bias.items())),
        min_tokens=p.min_tokens, grammar=p.grammar, n=p.n or 1,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
    )


def layout_to_pb(layout: KvLayout) -> pb.KvLayout:
    return pb.KvLayout(num_layers=layout.num_layers, block_size=layout.block_size, num_kv_heads=layout.num_kv_heads,
                       head_dim=layout.head_dim, dtype=layout.dtype, block_bytes=layout.block_bytes)


def layout_from_pb(p: pb.KvLayout, num_blocks: int) -> KvLayout:
    return KvLayout(num_blocks, p.num_layers, p.block_size, p.num_kv_heads, p.head_dim, p.dtype)


def delta_to_pb(out: RequestOutput, *, prompt_tokens: int = 0) -> pb.TokenDelta:
    delta = pb.TokenDelta(token_ids=out.new_token_ids, text=out.new_text,
                          finish_reason=FINISH_TO_PB[out.finish_reason],
                          prompt_tokens=prompt_tokens, cached_tokens=out.cached_tokens, index=out.index,
                          stop_reason="" if out.stop_reason is None else str(out.stop_reason))
    delta.logprobs.extend(_logprobs_pb(row) for row in out.logprobs or ())
    delta.prompt_logprobs.extend(_logprobs_pb(row) for row in out.prompt_logprobs or ())
    return delta


def _logprobs_pb(row: dict[int, float]) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(entries=[pb.TokenLogprob(token_id=t, logprob=v) for t, v in row.items()])


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: AsyncEngine, *, worker_id: str, endpoint: str, role: Role, model: str,
                 nixl: NixlConnector | None = None, image_limits: ImageLimits | None = None,
                 embedding_cache_bytes: int = 256 << 20, bundle: mtls.Bundle | None = None) -> None:
        self.engine = engine
        self.endpoint = endpoint  # how peers reach this worker: what its tickets name
        self.model = model
        self.bundle = bundle  # mTLS: who may call what (authz.py), the ticket key
        self.signer = Signer(bundle.ticket_key if bundle is not None else None)
        self.state = RoleState(worker_id, role, on_change=engine.stats_changed.set)
        self.in_flight = 0
        self.channels = WorkerStubs(bundle, grpc_stream.CHANNEL_OPTIONS)
        self.handoff = KvHandOff(engine, self.channels, nixl)
        self.images = ImageService(engine, self.channels, limits=image_limits or ImageLimits(),
                                   cache_bytes=embedding_cache_bytes, nixl=nixl, signer=self.signer)
        self.nixl = nixl
        self.health: Health | None = None
        self.health_server: grpc.aio.Server | None = None  # plaintext, health only (--health-port)
        self.health_port = 0

    @property
    def worker_id(self) -> str:
        return self.state.worker_id

    @worker_id.setter
    def worker_id(self, value: str) -> None:
        self.state.worker_id = value

    @property
    def role(self) -> Role:
        return self.state.role

    @property
    def draining(self) -> bool:
        return self.state.draining

    # ------------------------------------------------------------------ helpers
    def _admit(self, request_id: str, *, needs_prefill: bool = False, needs_decode: bool = False,
               needs_encode: bool = False) -> None:
        self.state.admit(request_id, self.engine.health(), needs_prefill=needs_prefill, needs_decode=needs_decode,
                         needs_encode=needs_encode)

    def _interrupt(self, request_id: str, reason: str) -> bool:
        """End a stream with UNAVAILABLE (the router resumes it elsewhere)."""
        return self.engine.interrupt(request_id, HandedOver(reason))

    def _prompt(self, request: pb.GenerateRequest | pb.PrefillRequest | pb.DecodeRequest) -> list[int]:
        """The prompt's token ids, its length bounded before they are copied (a message may carry
        millions: the server accepts 64 MiB)."""
        limit = self.engine.engine.max_model_len
        if len(request.prompt_token_ids) >= limit:
            raise ValueError(f"prompt has {len(request.prompt_token_ids)} tokens; at most {limit - 1} fit")
        return list(request.prompt_token_ids)

    def _check_ticket(self, kv: pb.KvTransferParams, **expect: str) -> None:
        """TicketRefused unless `kv` carries a valid ticket (signing.Signer.check_kv); first its token and
        block counts must fit this engine (ValueError), before an HMAC runs over block ids a message may
        carry by the million. Without a ticket key there is nothing to check: the engine's import checks
        the counts."""
        if not self.signer.enabled:
            return
        engine = self.engine.engine
        if not 0 < kv.num_tokens < engine.max_model_len:
            raise ValueError(f"KV of {kv.num_tokens} tokens; 1 to {engine.max_model_len - 1} fit")
        if len(kv.block_ids) != cdiv(kv.num_tokens, engine.layout.block_size):
            raise ValueError(f"{len(kv.block_ids)} KV blocks cannot hold exactly {kv.num_tokens} tokens "
                             f"of {engine.layout.block_size} per block")
        self.signer.check_kv(kv, **expect)

    @contextlib.asynccontextmanager
    async def _errors(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Map engine exceptions to status codes (status_of); count in-flight work."""
        self.in_flight += 1
        try:
            yield
        except Exception as exc:
            status = status_of(exc)
            if status is None:
                raise
            await context.abort(status.code, status.message, trailing_metadata=status.metadata)
        finally:
            self.in_flight -= 1

    # Streams below iterate the engine's async generators inside `aclosing`: when the client goes
    # away, gRPC closes the handler, and closing the engine stream at once aborts the request and
    # frees its blocks (an unclosed generator would linger until garbage collection).

    # ------------------------------------------------------------------ RPCs
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[pb.TokenDelta]:
        async with self._errors(context), contextlib.aclosing(self.generate(request)) as deltas:
            async for delta in deltas:
                yield delta

    async def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.TokenDelta, None]:
        """A Generate's deltas; its failures raise the exceptions that status_of maps (here and in a Session)."""
        self._admit(request.request_id, needs_decode=True)
        sampling = sampling_from_pb(request.sampling)
        prompt = self._prompt(request)
        images = await self.images.inputs(request.images)
        stream = self.engine.generate(request.request_id, prompt, sampling, request.resumed_output_tokens, images)
        with self.state.tracked(request.request_id, len(prompt), sampling.max_tokens,
                                movable=not request.resumed_output_tokens):
            async with contextlib.aclosing(stream) as outputs:
                first = True
                async for out in outputs:
                    yield delta_to_pb(out, prompt_tokens=len(prompt) if first else 0)
                    first = False

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        async with self._errors(context):
            self._admit(request.request_id, needs_prefill=True)
            sampling = sampling_from_pb(request.sampling)
            prompt = self._prompt(request)
            with self.state.prefilling():
                images = await self.images.inputs(request.images)
                export, first = await self.engine.prefill(request.request_id, prompt, sampling, images)
            kv = pb.KvTransferParams(
                request_id=request.request_id, source_worker=self.worker_id, source_endpoint=self.endpoint,
                block_ids=export.block_ids, layout=layout_to_pb(export.layout), num_tokens=export.num_tokens,
                first_token_id=export.first_token_id,
            )
            if self.nixl is not None:
                kv.nixl_agent_metadata = self.nixl.metadata
                kv.nixl_agent_name = self.nixl.name
                kv.kv_base_address = self.nixl.base_address
                kv.kv_memory, kv.kv_device_id = self.nixl.memory, self.nixl.device_id
            self.signer.sign_kv(kv, self.engine.pin_timeout_s)
            return pb.PrefillResponse(kv=kv, first=delta_to_pb(first, prompt_tokens=len(prompt)))
        raise AssertionError("unreachable: _errors aborts")  # pragma: no cover

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext,
                     ) -> AsyncIterator[pb.TokenDelta]:
        async with self._errors(context), contextlib.aclosing(self.decode(request)) as deltas:
            async for delta in deltas:
                yield delta

    async def decode(self, request: pb.DecodeRequest) -> AsyncGenerator[pb.TokenDelta, None]:
        """A Decode's deltas; failures raise as in `generate`."""
        self._admit(request.request_id, needs_decode=True)
        self._check_ticket(request.kv)  # before any connection to the endpoint it names
        images = self.images.spans(request.images)  # bounded and checked before the KV is looked at
        with self.state.tracked(request.request_id, len(request.prompt_token_ids), request.sampling.max_tokens):
            kv = request.kv
            export = KvExport(kv.request_id, layout_from_pb(kv.layout, len(kv.block_ids)), list(kv.block_ids),
                              kv.num_tokens, kv.first_token_id)
            outputs, first, backend = await self.handoff.adopt(
                request.request_id, self._prompt(request), sampling_from_pb(request.sampling), export, kv, images)
            async with contextlib.aclosing(outputs) as deltas:
                delta = delta_to_pb(first)
                delta.kv_backend = backend
                yield delta
                async for out in deltas:
                    yield delta_to_pb(out)

    async def Session(self, requests: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[pb.SessionBatch]:
        """Contract v2: a router's streams multiplexed over one gRPC stream (session.py)."""
        session = Session(self._open_stream)
        try:
            async with contextlib.aclosing(session.run(requests)) as batches:
                async for batch in batches:
                    yield batch
        except Malformed as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed session request: {exc}")

    def _open_stream(self, request: pb.StreamRequest) -> AsyncGenerator[pb.TokenDelta, None]:
        kind = request.WhichOneof("kind")
        if kind == "generate":
            return self._counted(self.generate(request.generate))
        if kind == "decode":
            return self._counted(self.decode(request.decode))
        raise ValueError("a session request must carry a generate, a decode or a cancel")

    async def _counted(self, deltas: AsyncGenerator[pb.TokenDelta, None]) -> AsyncGenerator[pb.TokenDelta, None]:
        self.in_flight += 1
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta
        finally:
            self.in_flight -= 1

    async def ReadKv(self, request: pb.ReadKvRequest, context: grpc.aio.ServicerContext,
                     ) -> AsyncIterator[pb.KvChunk]:
        async with self._errors(context):
            kv = request.kv
            self._check_ticket(kv, request_id=request.request_id, source_endpoint=self.endpoint)

            def same_blocks(held: list[int]) -> None:  # before a byte is copied
                if self.signer.enabled and held != list(kv.block_ids):
                    raise TicketRefused(f"the KV ticket names other blocks than {request.request_id} holds")

            data = await self.engine.read_pinned(request.request_id, same_blocks)
            block_bytes = self.engine.engine.layout.block_bytes
            for offset, count, payload in grpc_stream.chunks(data, block_bytes, request.max_chunk_bytes):
                yield pb.KvChunk(block_offset=offset, num_blocks=count, data=payload)

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        async with self._errors(context):
            self._admit("encode", needs_encode=True)
            key, cached, seconds = await self.images.encode(request.data)
            response = pb.EncodeResponse(digest=key, tokens=self.images.tokens_per_image, cached=cached,
                                         encode_seconds=seconds, slot=self.images.slot(key), endpoint=self.endpoint)
            self.signer.sign_image(response, self.images.cache.lease_s)
            return response
        raise AssertionError("unreachable: _errors aborts")  # pragma: no cover

    async def ReadEmbeddings(self, request: pb.ReadEmbeddingsRequest, context: grpc.aio.ServicerContext,
                             ) -> AsyncIterator[pb.EmbeddingsChunk]:
        async with self._errors(context):
            for chunk in self.images.chunks(request.digest, request.max_chunk_bytes):
                yield chunk

    async def ReleaseKv(self, request: pb.ReleaseKvRequest, context: grpc.aio.ServicerContext,
                        ) -> pb.ReleaseKvResponse:
        async with self._errors(context):
            self._check_ticket(request.kv, request_id=request.request_id, source_endpoint=self.endpoint)
            return pb.ReleaseKvResponse(released=await self.engine.release(request.request_id))
        raise AssertionError("unreachable: _errors aborts")  # pragma: no cover

    async def SetRole(self, request: pb.SetRoleRequest, context: grpc.aio.ServicerContext) -> pb.SetRoleResponse:
        if request.role not in role_pb.FROM_PB:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be encode, prefill, decode or both")
        grace = clamp(request.grace_seconds, 0.0, MAX_GRACE_S, 30.0) if request.HasField("grace_seconds") else 30.0
        target = role_pb.FROM_PB[request.role]
        try:
            previous, handed_over = await self.state.switch(target, grace, self._interrupt)
        except Refused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if previous != target:
            logger.info("Role changed from %s to %s (%d streams handed over)", previous, target, handed_over)
        return pb.SetRoleResponse(previous=role_pb.TO_PB[previous], current=role_pb.TO_PB[self.role],
                                  handed_over=handed_over)

    async def HandOver(self, request: pb.HandOverRequest, context: grpc.aio.ServicerContext,
                       ) -> pb.HandOverResponse:
        picked = self.state.movable(min(request.streams, MAX_HAND_OVER), request.max_context_tokens,
                                    request.min_new_tokens)
        handed = [rid for rid in picked if self._interrupt(rid, f"worker {self.worker_id} handed the stream over "
                                                                "to balance decode load")]
        if handed:
            logger.info("Handed %d streams over to balance decode load", len(handed))
        return pb.HandOverResponse(handed_over=len(handed))

    async def settle(self, grace: float, *, keeps_decoding: bool, keeps_prefilling: bool,
                     reason: str = "shutting down") -> int:
        """See RoleState.settle (the streams left are ended with UNAVAILABLE)."""
        return await self.state.settle(grace, keeps_decoding=keeps_decoding, keeps_prefilling=keeps_prefilling,
                                       interrupt=self._interrupt, reason=reason)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        self.state.drain()
        if self.health is not None:
            await self.health.set(False)
        return pb.DrainResponse(in_flight=self.in_flight)

    def stats_pb(self) -> pb.WorkerStats:
        s = self.engine.stats
        return pb.WorkerStats(
            worker_id=self.worker_id, role=role_pb.TO_PB[self.role], draining=self.draining,
            running_requests=s.running, waiting_requests=s.waiting, free_kv_blocks=s.free_blocks,
            total_kv_blocks=s.total_blocks, queued_prefill_tokens=s.queued_prefill_tokens, pinned_requests=s.pinned,
            block_size=self.engine.engine.layout.block_size, cached_block_hashes=s.cached_block_hashes,
            model=self.model, switching=self.state.switching, prefill_tokens_per_second=s.prefill_tokens_per_s,
            decode_step_seconds=s.decode_step_s, prefill_tokens_total=s.prefill_tokens_total,
            device=str(self.engine.engine.device), dtype=self.engine.engine.layout.dtype,
        )

    async def WatchStats(self, request: pb.WatchStatsRequest, context: grpc.aio.ServicerContext,
                         ) -> AsyncIterator[pb.WorkerStats]:
        interval = clamp(request.interval_seconds or 1.0, *STATS_INTERVAL_S, 1.0)
        coalesce = min(interval, STATS_COALESCE_S)
        while True:
            if self.engine.health() != "ok":  # the router marks this worker unhealthy and re-watches
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: engine "
                                                                 f"{self.engine.health()}")
            self.engine.stats_changed.clear()
            yield self.stats_pb()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine.stats_changed.wait(), timeout=interval)
            # Rate limit, not synchronisation: an engine changes state every step (~100/s under load);
            # one update per STATS_COALESCE_S carries them all and spares every watcher the rest.
            await asyncio.sleep(coalesce)


class _Malformed:
    """Stands in for a request whose bytes are not the method's protobuf message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that cannot raise: gRPC would answer INTERNAL and log a traceback."""
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Malformed(str(exc) or "not a valid message")

    return deserialize


async def _admissible(method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
    """Abort a call the caller's certificate does not allow (authz.py), then one that does not parse.
    A plaintext connection has no identity: only a worker without mTLS accepts one."""
    identity = mtls.peer_identity(context)
    if identity is not None and (reason := refusal(method, identity)) is not None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")


def _guard_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _admissible(method, request, context)
        return await behavior(request, context)

    return guarded


def _guard_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _admissible(method, request, context)
        async for item in behavior(request, context):
            yield item

    return guarded


def _guard_session(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _admissible(method, None, context)  # each request is checked as the session reads it
        async for item in behavior(requests, context):
            yield item

    return guarded


def _handlers(servicer: WorkerServicer) -> grpc.GenericRpcHandler:
    """WorkerService's method handlers, as the generated `add_..._to_server` builds them, except that the
    caller's identity is checked first (PERMISSION_DENIED) and a request that does not parse is
    INVALID_ARGUMENT (the generated ones answer INTERNAL)."""
    service = pb.DESCRIPTOR.services_by_name["WorkerService"]
    handlers = {}
    for method in service.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _guard_session(method.name, behavior), request_deserializer=_lenient(request.FromString),
                response_serializer=response.SerializeToString)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guard_stream(method.name, behavior), request_deserializer=_lenient(request.FromString),
                response_serializer=response.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(method.name, behavior), request_deserializer=_lenient(request.FromString),
                response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def serve(servicer: WorkerServicer, host: str, port: int, *,
                health_port: int | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (WorkerService + standard health checking; over mTLS when the servicer has
    a bundle); returns it and the bound port. `health_port`: also serve health checking alone, in
    plaintext, there (probes present no certificate); its server is `servicer.health_server`."""
    server = grpc.aio.server(options=grpc_stream.CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    address = f"{host}:{port}"
    if servicer.bundle is not None:
        bound = server.add_secure_port(address, servicer.bundle.server_credentials())
    else:
        bound = server.add_insecure_port(address)
    if health_port is not None:
        servicer.health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, servicer.health_server)
        servicer.health_port = servicer.health_server.add_insecure_port(f"{host}:{health_port}")
        await servicer.health_server.start()
    await server.start()
    await health.set(servicer.engine.health() == "ok" and not servicer.draining)
    servicer.health = health
    return server, bound
