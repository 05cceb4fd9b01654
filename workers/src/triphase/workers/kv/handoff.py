"""The decode side of a KV hand-off: bring a prefilled request's KV into this worker.

NIXL READ first (when both sides have it and their KV is in the same kind of memory: both on a GPU
or both on the host), straight out of the prefill worker's registered KV tensor into blocks reserved
here; the gRPC ReadKv stream otherwise, and as the fallback. Then the prefill worker
is told to free its copy (ReleaseKv).

Who frees what: the prefill worker keeps the blocks pinned until this ReleaseKv, the router's
(hand-off failed or cancelled) or its pin timeout. A NIXL READ that raced the timeout is detected
by the ReleaseKv answer (`released` false: the blocks may have been reused), one whose source died
by the ReleaseKv failing; both are a failed hand-off, decided before the imported blocks are
committed (and enter this worker's prefix cache), so a bad copy is never reused. The gRPC stream,
read to its end, needs no such proof. Any failure to obtain the KV is `HandOffFailed` (the router
then prefills on this worker).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Sequence

import grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.worker_stubs import WorkerStubs
from triphase.workers.engine.async_engine import AsyncEngine
from triphase.workers.engine.core import KvExport, RequestOutput
from triphase.workers.engine.multimodal import ImageInput
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.kv import grpc_stream
from triphase.workers.kv.nixl import NixlConnector, NixlUnavailable, can_read

logger = logging.getLogger(__name__)


class HandOffFailed(Exception):
    pass


class KvHandOff:
    def __init__(self, engine: AsyncEngine, channels: WorkerStubs, nixl: NixlConnector | None) -> None:
        self.engine = engine
        self.channels = channels
        self.nixl = nixl
        self.bytes_received: dict[str, int] = {"nixl": 0, "grpc": 0}
        self.nixl_fallbacks = 0

    async def adopt(self, request_id: str, prompt: list[int], sampling: SamplingParams, export: KvExport,
                    kv: pb.KvTransferParams, images: Sequence[ImageInput] = (),
                    ) -> tuple[AsyncGenerator[RequestOutput, None], RequestOutput, str]:
        """Import the KV described by `export` (from the worker `kv` names) and compute the request's
        first output here. Returns (the rest of its outputs, the first, the backend that moved it).
        `images`: the prompt's image spans (their digests key the prefix cache)."""
        source = f"KV hand-off of {kv.request_id} from {kv.source_worker or kv.source_endpoint}"
        if not self.engine.engine.layout.compatible_with(export.layout):
            raise HandOffFailed(f"{source} failed: KV layouts differ ({export.layout} vs ours)")
        # Before a block is reserved or a byte pulled: counts, token ids, lengths (ValueError).
        self.engine.engine.check_import(request_id, prompt, sampling, export, images)
        if self.nixl is not None and kv.nixl_agent_metadata and can_read(self.nixl.memory, kv.kv_memory):
            nixl = self.nixl

            async def fill(dst: list[int]) -> None:
                src = list(kv.block_ids)[len(kv.block_ids) - len(dst):]  # the live tail (sliding windows)
                moved = await asyncio.to_thread(nixl.read, kv.nixl_agent_metadata, kv.kv_base_address,
                                                src, dst, remote_memory=kv.kv_memory,
                                                remote_device=kv.kv_device_id)
                self.bytes_received["nixl"] += moved
                if not await self.release_source(kv):  # whole only if the pin held (module docstring)
                    raise HandOffFailed(f"{source} failed: the source did not hold the KV through the transfer")

            outputs = self.engine.import_and_decode(request_id, prompt, sampling, export, fill, images)
            try:
                return outputs, await anext(outputs), "nixl"
            except NixlUnavailable as exc:
                await outputs.aclose()
                logger.warning("NIXL transfer of %s failed (%s); falling back to the gRPC stream", kv.request_id,
                               exc)
                self.nixl_fallbacks += 1
        try:
            data, received = await grpc_stream.pull(self.channels, kv.source_endpoint, kv, export.layout,
                                                    len(kv.block_ids))
        except grpc.aio.AioRpcError as exc:
            raise HandOffFailed(f"{source} failed: {exc.code().name}: {exc.details()}") from None
        self.bytes_received["grpc"] += received
        outputs = self.engine.import_and_decode(request_id, prompt, sampling, dataclasses.replace(export, data=data),
                                                images=images)
        first = await anext(outputs)
        await self.release_source(kv)
        return outputs, first, "grpc"

    async def release_source(self, kv: pb.KvTransferParams) -> bool:
        """ReleaseKv on the prefill worker: whether it still held the pin (False if unreachable)."""
        try:
            return bool((await self.channels.stub(kv.source_endpoint).ReleaseKv(
                pb.ReleaseKvRequest(request_id=kv.request_id, kv=kv), timeout=10)).released)
        except grpc.aio.AioRpcError as exc:
            logger.warning("Could not release %s on %s: %s", kv.request_id, kv.source_endpoint, exc.code().name)
            return False
