"""The gRPC WorkerService around the engine: protobuf <-> engine types, roles, KV hand-off.

This is the only module that converts between protobuf messages and engine types. Errors become
gRPC status codes: INVALID_ARGUMENT for bad input, NOT_FOUND for unknown pinned KV,
RESOURCE_EXHAUSTED when the KV cache has no room, FAILED_PRECONDITION when the role or drain
state refuses the call, UNAVAILABLE while the role is switching or the engine is not healthy (and
for streams handed over by a switch or a shutdown), ABORTED when a Decode could not obtain its KV
(the router then prefills elsewhere), INTERNAL when the engine failed computing the request (the
message never carries internal exception text). Numbers a caller controls are bounded here or in
SamplingParams before any work is done on them.

Who frees pinned KV: the prefill worker keeps a prefilled request's blocks pinned until the decode
worker's ReleaseKv (sent once the blocks are in its own cache), the router's ReleaseKv (hand-off
failed or cancelled), or the pin timeout. A NIXL READ that raced the timeout is detected by the
ReleaseKv answer (`released` false: the blocks may have been reused), one whose source died by the
ReleaseKv failing; both are a failed hand-off, decided before the imported blocks are committed
(and enter the prefix cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.roles import Role
from triphase.workers.engine.async_engine import AsyncEngine, EngineFailed
from triphase.workers.engine.core import KvExport, RequestOutput
from triphase.workers.engine.kv_layout import KvLayout
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.kv import grpc_stream
from triphase.workers.kv.nixl import NixlConnector, NixlUnavailable
from triphase.workers.lifecycle import Health

logger = logging.getLogger(__name__)

ROLE_TO_PB = {Role.ENCODE: pb.ROLE_ENCODE, Role.PREFILL: pb.ROLE_PREFILL, Role.DECODE: pb.ROLE_DECODE,
              Role.BOTH: pb.ROLE_BOTH}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}
FINISH_TO_PB = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


STATS_COALESCE_S = 0.05  # WatchStats sends at most one update per this many seconds
STATS_INTERVAL_S = (0.05, 60.0)  # WatchStats interval_seconds is clamped to this range (default 1)
MAX_GRACE_S = 3600.0  # SetRole grace_seconds is clamped to [0, this] (default 30)
MAX_REQUEST_ID_CHARS = 256


def clamp(value: float, low: float, high: float, default: float) -> float:
    """`value` within [low, high]; `default` for NaN or infinity."""
    return min(max(value, low), high) if math.isfinite(value) else default


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _HandOffFailed(Exception):
    """The KV of a Decode request could not be obtained from its prefill worker."""


def sampling_from_pb(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens or 16, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos, logprobs=p.logprobs if p.HasField("logprobs") else None,
    )


def layout_to_pb(layout: KvLayout) -> pb.KvLayout:
    return pb.KvLayout(num_layers=layout.num_layers, block_size=layout.block_size, num_kv_heads=layout.num_kv_heads,
                       head_dim=layout.head_dim, dtype=layout.dtype, block_bytes=layout.block_bytes)


def layout_from_pb(p: pb.KvLayout, num_blocks: int) -> KvLayout:
    return KvLayout(num_blocks, p.num_layers, p.block_size, p.num_kv_heads, p.head_dim, p.dtype)


def delta_to_pb(out: RequestOutput, *, prompt_tokens: int = 0) -> pb.TokenDelta:
    delta = pb.TokenDelta(token_ids=out.new_token_ids, text=out.new_text,
                          finish_reason=FINISH_TO_PB[out.finish_reason],
                          prompt_tokens=prompt_tokens, cached_tokens=out.cached_tokens,
                          stop_reason="" if out.stop_reason is None else str(out.stop_reason))
    for row in out.logprobs or ():
        entries = [pb.TokenLogprob(token_id=t, logprob=v) for t, v in row.items()]
        delta.logprobs.append(pb.TokenLogprobs(entries=entries))
    return delta


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: AsyncEngine, *, worker_id: str, endpoint: str, role: Role, model: str,
                 nixl: NixlConnector | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.role = role
        self.model = model
        self.draining = False
        self.switching = False
        self.in_flight = 0
        self.streams: set[str] = set()  # request ids of decoding streams (Generate or Decode)
        self.prefills = 0
        self.channels = grpc_stream.ChannelPool()
        self.nixl = nixl
        self.kv_bytes_received: dict[str, int] = {"nixl": 0, "grpc": 0}
        self.nixl_fallbacks = 0
        self.health: Health | None = None
        self.stream_done = asyncio.Event()

    # ------------------------------------------------------------------ helpers
    def _admit(self, request_id: str, *, needs_prefill: bool = False, needs_decode: bool = False) -> None:
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
        if self.engine.health() != "ok":
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: engine {self.engine.health()}")
        if self.draining:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.worker_id} is draining")
        if self.switching:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is switching its role")
        if needs_prefill and not self.role.can_prefill:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.worker_id} is {self.role}, not prefill")
        if needs_decode and not self.role.can_decode:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.worker_id} is {self.role}, not decode")

    def _prompt(self, request: pb.GenerateRequest | pb.PrefillRequest | pb.DecodeRequest) -> list[int]:
        """The prompt's token ids, its length bounded before they are copied (a message may carry
        millions: the server accepts 64 MiB)."""
        limit = self.engine.engine.max_model_len
        if len(request.prompt_token_ids) >= limit:
            raise ValueError(f"prompt has {len(request.prompt_token_ids)} tokens; at most {limit - 1} fit")
        return list(request.prompt_token_ids)

    @contextlib.asynccontextmanager
    async def _errors(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Map engine exceptions to status codes; count in-flight work."""
        self.in_flight += 1
        try:
            yield
        except _Refused as exc:
            await context.abort(exc.code, str(exc))
        except _HandOffFailed as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0] if exc.args else exc))
        except MemoryError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineFailed as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        finally:
            self.in_flight -= 1

    # Streams below iterate the engine's async generators inside `aclosing`: when the client goes
    # away, gRPC closes the handler, and closing the engine stream at once aborts the request and
    # frees its blocks (an unclosed generator would linger until garbage collection).

    # ------------------------------------------------------------------ RPCs
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[pb.TokenDelta]:
        async with self._errors(context):
            self._admit(request.request_id, needs_decode=True)
            sampling = sampling_from_pb(request.sampling)
            prompt = self._prompt(request)
            stream = self.engine.generate(request.request_id, prompt, sampling, request.resumed_output_tokens)
            with self._tracked(request.request_id):
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
            self.prefills += 1
            try:
                export, first = await self.engine.prefill(request.request_id, prompt, sampling)
            finally:
                self.prefills -= 1
            kv = pb.KvTransferParams(
                request_id=request.request_id, source_worker=self.worker_id, source_endpoint=self.endpoint,
                block_ids=export.block_ids, layout=layout_to_pb(export.layout), num_tokens=export.num_tokens,
                first_token_id=export.first_token_id,
            )
            if self.nixl is not None:
                kv.nixl_agent_metadata = self.nixl.metadata
                kv.nixl_agent_name = self.nixl.name
                kv.kv_base_address = self.nixl.base_address
            return pb.PrefillResponse(kv=kv, first=delta_to_pb(first, prompt_tokens=len(prompt)))
        raise AssertionError("unreachable: _errors aborts")  # pragma: no cover

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext,
                     ) -> AsyncIterator[pb.TokenDelta]:
        async with self._errors(context):
            self._admit(request.request_id, needs_decode=True)
            with self._tracked(request.request_id):
                outputs, first, backend = await self._adopt(request)
                async with contextlib.aclosing(outputs) as deltas:
                    delta = delta_to_pb(first)
                    delta.kv_backend = backend
                    yield delta
                    async for out in deltas:
                        yield delta_to_pb(out)

    async def _adopt(self, request: pb.DecodeRequest,
                     ) -> tuple[AsyncGenerator[RequestOutput, None], RequestOutput, str]:
        """Bring a prefilled request's KV into this worker and compute its first output here.
        NIXL READ first (when both sides have it), the gRPC stream as fallback; then the prefill
        worker is told to free its copy. Any failure to obtain the KV is a `_HandOffFailed`."""
        sampling = sampling_from_pb(request.sampling)
        prompt = self._prompt(request)
        kv = request.kv
        export = KvExport(kv.request_id, layout_from_pb(kv.layout, len(kv.block_ids)), list(kv.block_ids),
                          kv.num_tokens, kv.first_token_id)
        source = f"KV hand-off of {kv.request_id} from {kv.source_worker or kv.source_endpoint}"
        if not self.engine.engine.layout.compatible_with(export.layout):
            raise _HandOffFailed(f"{source} failed: KV layouts differ ({export.layout} vs ours)")
        # Before a block is reserved or a byte pulled: counts, token ids, lengths (ValueError).
        self.engine.engine.check_import(request.request_id, prompt, sampling, export)
        backend = "grpc"
        if self.nixl is not None and kv.nixl_agent_metadata:
            nixl = self.nixl

            async def fill(dst: list[int]) -> None:
                moved = await asyncio.to_thread(nixl.read, kv.nixl_agent_metadata, kv.kv_base_address,
                                                list(kv.block_ids), dst)
                self.kv_bytes_received["nixl"] += moved
                # A READ is only known to be whole if the source still held the pin after it: one whose
                # pin expired may have reused the blocks, one that died (or was restarted on its port)
                # may have died during the READ. Checked here, before the import commits and the
                # blocks enter the prefix cache, so that a bad copy is never reused by a later request.
                if not await self._release_source(kv):
                    raise _HandOffFailed(f"{source} failed: the source did not hold the KV through the transfer")

            outputs = self.engine.import_and_decode(request.request_id, prompt, sampling, export, fill)
            try:
                first = await anext(outputs)
                backend = "nixl"
            except NixlUnavailable as exc:
                await outputs.aclose()
                logger.warning("NIXL transfer of %s failed (%s); falling back to the gRPC stream", kv.request_id,
                               exc)
                self.nixl_fallbacks += 1
        if backend == "grpc":  # the stream, read to its end, needs no proof; the source frees its copy
            try:
                outputs = await self._grpc_import(request, prompt, sampling, export)
            except grpc.aio.AioRpcError as exc:
                raise _HandOffFailed(f"{source} failed: {exc.code().name}: {exc.details()}") from None
            first = await anext(outputs)
            await self._release_source(kv)
        return outputs, first, backend

    async def _release_source(self, kv: pb.KvTransferParams) -> bool:
        """ReleaseKv on the prefill worker: whether it still held the pin (False if unreachable)."""
        try:
            return bool((await self.channels.stub(kv.source_endpoint).ReleaseKv(
                pb.ReleaseKvRequest(request_id=kv.request_id), timeout=10)).released)
        except grpc.aio.AioRpcError as exc:
            logger.warning("Could not release %s on %s: %s", kv.request_id, kv.source_endpoint, exc.code().name)
            return False

    async def _grpc_import(self, request: pb.DecodeRequest, prompt: list[int], sampling: SamplingParams,
                           export: KvExport) -> AsyncGenerator[RequestOutput, None]:
        """Pull the blocks over the ReadKv stream, then adopt them."""
        kv = request.kv
        data, received = await grpc_stream.pull(self.channels, kv.source_endpoint, kv.request_id, export.layout,
                                                len(kv.block_ids))
        self.kv_bytes_received["grpc"] += received
        export = dataclasses.replace(export, data=data)
        return self.engine.import_and_decode(request.request_id, prompt, sampling, export)

    async def ReadKv(self, request: pb.ReadKvRequest, context: grpc.aio.ServicerContext,
                     ) -> AsyncIterator[pb.KvChunk]:
        async with self._errors(context):
            _, data = await self.engine.read_pinned(request.request_id)
            block_bytes = self.engine.engine.layout.block_bytes
            for offset, count, payload in grpc_stream.chunks(data, block_bytes, request.max_chunk_bytes):
                yield pb.KvChunk(block_offset=offset, num_blocks=count, data=payload)

    async def ReleaseKv(self, request: pb.ReleaseKvRequest, context: grpc.aio.ServicerContext,
                        ) -> pb.ReleaseKvResponse:
        return pb.ReleaseKvResponse(released=await self.engine.release(request.request_id))

    @contextlib.contextmanager
    def _tracked(self, request_id: str) -> Iterator[None]:
        """Register a decoding stream, so that a role switch can wait for it or hand it over."""
        self.streams.add(request_id)
        try:
            yield
        finally:
            self.streams.discard(request_id)
            self.stream_done.set()

    async def SetRole(self, request: pb.SetRoleRequest, context: grpc.aio.ServicerContext) -> pb.SetRoleResponse:
        if request.role not in ROLE_FROM_PB:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be encode, prefill, decode or both")
        if self.switching:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a role switch is already in progress")
        previous, target = self.role, ROLE_FROM_PB[request.role]
        grace = clamp(request.grace_seconds, 0.0, MAX_GRACE_S, 30.0) if request.HasField("grace_seconds") else 30.0
        handed_over = 0
        if target != previous:
            self.switching = True
            self.engine.stats_changed.set()
            try:
                handed_over = await self.settle(grace, keeps_decoding=target.can_decode,
                                                keeps_prefilling=target.can_prefill, reason=f"switched to {target}")
                self.role = target
            finally:
                self.switching = False
                self.engine.stats_changed.set()
            logger.info("Role changed from %s to %s (%d streams handed over)", previous, target, handed_over)
        return pb.SetRoleResponse(previous=ROLE_TO_PB[previous], current=ROLE_TO_PB[self.role],
                                  handed_over=handed_over)

    async def settle(self, grace: float, *, keeps_decoding: bool, keeps_prefilling: bool,
                     reason: str = "shutting down") -> int:
        """Wait up to `grace` seconds for the work that is to stop (decoding streams, prefills); hand
        over the streams left (UNAVAILABLE: the router resumes them). Returns how many were handed
        over. Pinned prefill KV is left alone: its reader, or the pin timeout, frees it."""
        def blocking() -> bool:
            return (bool(self.streams) and not keeps_decoding) or (self.prefills > 0 and not keeps_prefilling)

        deadline = asyncio.get_running_loop().time() + grace
        while blocking():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self.stream_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stream_done.wait(), timeout=min(remaining, 0.5))
        if keeps_decoding:
            return 0
        handed = [rid for rid in list(self.streams)
                  if self.engine.interrupt(rid, _Refused(grpc.StatusCode.UNAVAILABLE,
                                                         f"worker {self.worker_id} {reason}"))]
        # Wait until those streams have ended (they end at their next engine step).
        while any(rid in self.streams for rid in handed):
            self.stream_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stream_done.wait(), timeout=0.5)
        return len(handed)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        self.draining = True
        self.engine.stats_changed.set()
        if self.health is not None:
            await self.health.set(False)
        return pb.DrainResponse(in_flight=self.in_flight)

    def stats_pb(self) -> pb.WorkerStats:
        s = self.engine.stats
        return pb.WorkerStats(
            worker_id=self.worker_id, role=ROLE_TO_PB[self.role], draining=self.draining,
            running_requests=s.running, waiting_requests=s.waiting, free_kv_blocks=s.free_blocks,
            total_kv_blocks=s.total_blocks, queued_prefill_tokens=s.queued_prefill_tokens, pinned_requests=s.pinned,
            block_size=self.engine.engine.layout.block_size, cached_block_hashes=s.cached_block_hashes,
            model=self.model, switching=self.switching, prefill_tokens_per_second=s.prefill_tokens_per_s,
            decode_step_seconds=s.decode_step_s,
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


def _guard_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")
        return await behavior(request, context)

    return guarded


def _guard_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")
        async for item in behavior(request, context):
            yield item

    return guarded


def _handlers(servicer: WorkerServicer) -> grpc.GenericRpcHandler:
    """WorkerService's method handlers, as the generated `add_..._to_server` builds them, except that a
    request that does not parse is INVALID_ARGUMENT (the generated ones answer INTERNAL)."""
    service = pb.DESCRIPTOR.services_by_name["WorkerService"]
    handlers = {}
    for method in service.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guard_stream(behavior), request_deserializer=_lenient(request.FromString),
                response_serializer=response.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(behavior), request_deserializer=_lenient(request.FromString),
                response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def serve(servicer: WorkerServicer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (WorkerService + standard health checking); returns it and the bound port."""
    server = grpc.aio.server(options=grpc_stream.CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health.set(servicer.engine.health() == "ok" and not servicer.draining)
    servicer.health = health
    return server, bound
