"""A worker's images: embeddings cached by content digest, made here or read from an encode worker.

`ImageService.inputs` turns a request's `PromptImage`s into the engine's `ImageInput`s: the cached
embeddings for the digest if this worker has them; else read from the encode worker the router
named (ReadEmbeddings, a stream of chunks); else the image is decoded and encoded here. `encode`
serves the Encode RPC. Decoding runs in a small thread pool (bounded concurrency: at most
`decode_threads` decoded images, each within `ImageLimits`, exist at once) and never on the event
loop; the vision encoder runs on the engine thread, between steps. A client's bytes are checked
against the digest the router computed, so a cached embedding is always that image's.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Iterator, Sequence

import torch

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.block_hash import ImageSpan
from triphase.common.images import ImageLimits, decode, digest
from triphase.workers.engine.async_engine import AsyncEngine
from triphase.workers.engine.model_runner import TORCH_DTYPES
from triphase.workers.engine.multimodal import ImageInput
from triphase.workers.kv.grpc_stream import DEFAULT_CHUNK_BYTES, ChannelPool

DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


class EmbeddingCache:
    """Embeddings by image digest, least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()

    def get(self, key: bytes) -> torch.Tensor | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        self._entries[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()

    def __len__(self) -> int:
        return len(self._entries)


@dataclasses.dataclass
class ImageCounters:
    encoded: int = 0  # images this worker encoded
    encode_seconds: float = 0.0
    cache_hits: int = 0  # images whose embeddings were already here
    cache_misses: int = 0
    received_bytes: int = 0  # embedding bytes read from encode workers
    sent_bytes: int = 0  # embedding bytes served to other workers


class ImageService:
    def __init__(self, engine: AsyncEngine, channels: ChannelPool, *, limits: ImageLimits,
                 cache_bytes: int = 256 << 20, decode_threads: int = 2, read_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.channels = channels
        self.limits = limits
        self.cache = EmbeddingCache(cache_bytes)
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
        if self.cache.get(key) is not None:
            self.counters.cache_hits += 1
            return key, True, 0.0
        self.counters.cache_misses += 1
        started = time.monotonic()
        await self._encode(key, data)
        return key, False, time.monotonic() - started

    async def _encode(self, key: bytes, data: bytes) -> torch.Tensor:
        running = self._encoding.get(key)
        if running is not None:  # the same image in flight (one request's repeats, or two requests)
            return await asyncio.shield(running)
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._encoding[key] = future
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
        self.counters.received_bytes += len(buffer)
        return values.view(rows, cols).to(TORCH_DTYPES[self.engine.engine.config.dtype])

    # ------------------------------------------------------------------ requests
    def spans(self, images: Sequence[pb.PromptImage]) -> list[ImageInput]:
        """Spans and digests only (a Decode: the KV holds the images)."""
        return [ImageInput(self._span(image)) for image in images]

    async def inputs(self, images: Sequence[pb.PromptImage]) -> list[ImageInput]:
        """Every image's embeddings, gathered at once; ValueError for an image that cannot be had."""
        if images and not self.enabled:
            raise ValueError("this worker's model takes no images")
        if len(images) > self.limits.max_images:
            raise ValueError(f"{len(images)} images; at most {self.limits.max_images} per request")
        embeds = await asyncio.gather(*(self._embeddings(image) for image in images))
        return [ImageInput(self._span(image), rows) for image, rows in zip(images, embeds, strict=True)]

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
