"""A worker's images: embeddings cached by content digest, made here or read from an encode worker.

`ImageService.inputs` turns a request's `PromptImage`s into the engine's `ImageInput`s: the cached
embeddings for the digest if this worker has them; else read from the encode worker the router
named (a NIXL READ of its cache slot, or the ReadEmbeddings gRPC stream); else the image is decoded
and encoded here. `encode`
serves the Encode RPC. Decoding runs in a small thread pool (bounded concurrency: at most
`decode_threads` decoded images, each within `ImageLimits`, exist at once) and never on the event
loop; the vision encoder runs on the engine thread, between steps. A client's bytes are checked
against the digest the router computed, so a cached embedding is always that image's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

import torch

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.block_hash import ImageSpan
from triphase.common.images import ImageLimits, decode, digest
from triphase.common.worker_stubs import WorkerStubs
from triphase.workers.embedding_cache import EmbeddingCache
from triphase.workers.engine.async_engine import AsyncEngine
from triphase.workers.engine.model_runner import TORCH_DTYPES
from triphase.workers.engine.multimodal import ImageInput
from triphase.workers.kv.grpc_stream import DEFAULT_CHUNK_BYTES
from triphase.workers.kv.nixl import NixlConnector, NixlUnavailable
from triphase.workers.signing import Signer, TicketRefused

logger = logging.getLogger(__name__)

DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclasses.dataclass
class ImageCounters:
    encoded: int = 0  # images this worker encoded
    encode_seconds: float = 0.0
    cache_hits: int = 0  # images whose embeddings were already here
    cache_misses: int = 0
    queued: int = 0  # images being decoded or encoded here, or waiting to be
    received_bytes: dict[str, int] = dataclasses.field(default_factory=lambda: {"nixl": 0, "grpc": 0})
    sent_bytes: int = 0  # embedding bytes served to other workers over gRPC (a NIXL READ is the reader's)


class ImageService:
    def __init__(self, engine: AsyncEngine, channels: WorkerStubs, *, limits: ImageLimits,
                 cache_bytes: int = 256 << 20, decode_threads: int = 2, read_timeout_s: float = 30.0,
                 nixl: NixlConnector | None = None, signer: Signer | None = None) -> None:
        self.engine = engine
        self.signer = signer or Signer(None)  # checks where the router says an image's embeddings are
        self.channels = channels
        self.limits = limits
        model = engine.engine
        rows = model.vision_config.tokens_per_image if model.vision_config is not None else 0
        self.cache = EmbeddingCache(cache_bytes if rows else 0, rows, model.model_config.hidden_size,
                                    TORCH_DTYPES[model.config.dtype])
        self.nixl = nixl if self.cache.num_slots else None
        if self.nixl is not None:
            try:
                self.nixl.register(self.cache.buffer)
            except NixlUnavailable as exc:
                logger.warning("Image embeddings move over gRPC only: %s", exc)
                self.nixl = None
        self.counters = ImageCounters()
        self.read_timeout_s = read_timeout_s
        self._decoder = concurrent.futures.ThreadPoolExecutor(decode_threads, thread_name_prefix="triphase-decode")
        self._encoding: dict[bytes, asyncio.Future[torch.Tensor]] = {}  # one encode per digest at a time

    @property
    def enabled(self) -> bool:
        return self.engine.engine.vision is not None

    @property
    def tokens_per_image(self) -> int:
        config = self.engine.engine.vision_config
        return config.tokens_per_image if config is not None else 0

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ Encode
    async def encode(self, data: bytes) -> tuple[bytes, bool, float]:
        """(digest, already cached, seconds spent encoding) for one encoded image."""
        if not self.enabled:
            raise ValueError("this worker's model takes no images")
        key = digest(data)
        if self.cache.slot_of(key) is not None:
            self.counters.cache_hits += 1
            return key, True, 0.0
        self.counters.cache_misses += 1
        started = time.monotonic()
        await self._encode(key, data)
        return key, False, time.monotonic() - started

    def slot(self, key: bytes) -> pb.EmbeddingsSlot | None:
        """Where a cached image's embeddings are, for a peer's NIXL READ (None without NIXL)."""
        slot = self.cache.slot_of(key)
        if self.nixl is None or slot is None:
            return None
        return pb.EmbeddingsSlot(nixl_agent_metadata=self.nixl.metadata, address=self.cache.address(slot),
                                 nbytes=self.cache.slot_bytes)

    async def _encode(self, key: bytes, data: bytes) -> torch.Tensor:
        running = self._encoding.get(key)
        if running is not None:  # the same image in flight (one request's repeats, or two requests)
            return await asyncio.shield(running)
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._encoding[key] = future
        self.counters.queued += 1
        try:
            started = time.monotonic()
            image = await asyncio.get_running_loop().run_in_executor(self._decoder, decode, data, self.limits)
            engine = self.engine.engine
            rows = (await self.engine.call(lambda: engine.encode_images([image])))[0]
            self.counters.encoded += 1
            self.counters.encode_seconds += time.monotonic() - started
            self.cache.put(key, rows)
            future.set_result(rows)
            return rows
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: awaiting it is optional for the others
            raise
        finally:
            self._encoding.pop(key, None)
            self.counters.queued -= 1

    # ------------------------------------------------------------------ ReadEmbeddings
    def chunks(self, key: bytes, max_chunk_bytes: int) -> Iterator[pb.EmbeddingsChunk]:
        rows = self.cache.get(key)
        if rows is None:
            raise KeyError(f"no embeddings for image {key.hex()[:16]} here")
        raw = rows.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        step = max(1, min(max_chunk_bytes or DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES))
        for offset in range(0, max(len(raw), 1), step):
            first = offset == 0
            yield pb.EmbeddingsChunk(rows=rows.shape[0] if first else 0, cols=rows.shape[1] if first else 0,
                                     dtype=DTYPE_NAMES[rows.dtype] if first else "", offset=offset,
                                     data=raw[offset : offset + step])
        self.counters.sent_bytes += len(raw)

    async def _read(self, endpoint: str, key: bytes, rows: int, cols: int) -> torch.Tensor:
        expected = rows * cols
        buffer = bytearray()
        dtype = ""
        stream = self.channels.stub(endpoint).ReadEmbeddings(pb.ReadEmbeddingsRequest(digest=key),
                                                            timeout=self.read_timeout_s)
        async for chunk in stream:
            if chunk.offset == 0:
                if (chunk.rows, chunk.cols) != (rows, cols) or chunk.dtype not in TORCH_DTYPES:
                    raise ValueError(f"embeddings from {endpoint} are {chunk.rows}x{chunk.cols} {chunk.dtype}, "
                                     f"expected {rows}x{cols}")
                dtype = chunk.dtype
            if chunk.offset != len(buffer) or not dtype:
                raise ValueError(f"embedding chunks from {endpoint} out of order")
            buffer += chunk.data
            if len(buffer) > expected * 4:
                raise ValueError(f"embeddings from {endpoint} are larger than announced")
        if not dtype:
            raise ValueError(f"{endpoint} sent no embeddings")
        values = torch.frombuffer(buffer, dtype=TORCH_DTYPES[dtype])
        if values.numel() != expected:
            raise ValueError(f"received {values.numel()} of {expected} embedding values from {endpoint}")
        self.counters.received_bytes["grpc"] += len(buffer)
        return values.view(rows, cols).to(TORCH_DTYPES[self.engine.engine.config.dtype])

    async def _read_slot(self, key: bytes, remote: pb.EmbeddingsSlot) -> torch.Tensor | None:
        """READ an encode worker's cache slot into one of ours with NIXL; None if it cannot be had
        (no NIXL, a different slot layout, the slot reused meanwhile: the caller falls back)."""
        nixl = self.nixl
        if nixl is None or remote.nbytes != self.cache.slot_bytes or not remote.nixl_agent_metadata:
            return None
        local = self.cache.reserve()
        if local is None:
            return None
        try:
            moved = await asyncio.to_thread(nixl.read_ranges, remote.nixl_agent_metadata,
                                            [(remote.address, self.cache.address(local), remote.nbytes)])
        except NixlUnavailable as exc:
            self.cache.release(local)
            logger.warning("NIXL read of image %s failed (%s); reading it over gRPC", key.hex()[:16], exc)
            return None
        rows = self.cache.accept(key, local)
        if rows is not None:
            self.counters.received_bytes["nixl"] += moved
        return rows

    # ------------------------------------------------------------------ requests
    def spans(self, images: Sequence[pb.PromptImage]) -> list[ImageInput]:
        """Spans and digests only (a Decode: the KV holds the images); ValueError before any work for
        too many images, a model without vision, or a span or digest that cannot be this model's."""
        if images and not self.enabled:
            raise ValueError("this worker's model takes no images")
        if len(images) > self.limits.max_images:
            raise ValueError(f"{len(images)} images; at most {self.limits.max_images} per request")
        return [ImageInput(self._span(image)) for image in images]

    async def inputs(self, images: Sequence[pb.PromptImage]) -> list[ImageInput]:
        """Every image's embeddings, gathered at once, after `spans` checked them; ValueError for an image
        that cannot be had."""
        spans = self.spans(images)
        embeds = await asyncio.gather(*(self._embeddings(image) for image in images))
        return [dataclasses.replace(span, embeds=rows) for span, rows in zip(spans, embeds, strict=True)]

    def _span(self, image: pb.PromptImage) -> ImageSpan:
        if len(image.digest) != 32:
            raise ValueError("an image's digest is its 32-byte sha256")
        if image.length != self.tokens_per_image:
            raise ValueError(f"an image takes {self.tokens_per_image} tokens with this model, not {image.length}")
        return ImageSpan(image.offset, image.length, image.digest)

    async def _embeddings(self, image: pb.PromptImage) -> torch.Tensor:
        key = image.digest
        cached = self.cache.get(key)
        if cached is not None:
            self.counters.cache_hits += 1
            return cached
        self.counters.cache_misses += 1
        cols = self.engine.engine.model_config.hidden_size
        if image.source_endpoint or image.HasField("slot"):
            try:
                self.signer.check_image(image)  # before connecting anywhere or reading any memory
            except TicketRefused as exc:
                if not image.data:
                    raise
                logger.warning("Encoding image %s here: %s", key.hex()[:16], exc)
                image = pb.PromptImage(offset=image.offset, length=image.length, digest=key, data=image.data)
        if image.HasField("slot"):
            rows = await self._read_slot(key, image.slot)
            if rows is not None:
                return rows
        if image.source_endpoint:
            try:
                rows = await self._read(image.source_endpoint, key, image.length, cols)
            except Exception:
                if not image.data:
                    raise
            else:
                self.cache.put(key, rows)
                return rows
        if not image.data:
            raise ValueError(f"image {key.hex()[:16]} is not cached here and came without its bytes")
        if digest(image.data) != key:
            raise ValueError("an image's bytes do not match its digest")
        return await self._encode(key, image.data)  # ImageError is a ValueError: INVALID_ARGUMENT
