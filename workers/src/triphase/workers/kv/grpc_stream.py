"""The gRPC stream KV connector: the fallback when NIXL is unavailable or fails.

Source side: a pinned request's blocks are copied out of the KV tensor and streamed as chunks of
whole blocks (`chunks`). Receiver side: `pull` reads the stream from the source worker's ReadKv
and reassembles one [num_blocks, *block_shape] tensor ready for `Engine.import_kv`. The receiver
acknowledges with ReleaseKv once the blocks are in its own cache; the source frees them then.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from triphase.api.v1 import worker_pb2
from triphase.common.worker_stubs import WorkerStubs
from triphase.workers.engine.kv_layout import KvLayout
from triphase.workers.engine.model_runner import TORCH_DTYPES

DEFAULT_CHUNK_BYTES = 2 << 20
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def chunks(data: torch.Tensor, block_bytes: int, max_chunk_bytes: int) -> Iterator[tuple[int, int, bytes]]:
    """(block_offset, num_blocks, bytes) pieces of a [num_blocks, ...] tensor, whole blocks each."""
    raw = data.contiguous().view(torch.uint8).reshape(data.shape[0], -1)
    per_chunk = max(1, (max_chunk_bytes or DEFAULT_CHUNK_BYTES) // block_bytes)
    for start in range(0, data.shape[0], per_chunk):
        piece = raw[start : start + per_chunk]
        yield start, piece.shape[0], piece.numpy().tobytes()


async def pull(pool: WorkerStubs, endpoint: str, kv: worker_pb2.KvTransferParams, layout: KvLayout,
               num_blocks: int, timeout_s: float = 30.0) -> tuple[torch.Tensor, int]:
    """Read a pinned request's blocks from `endpoint` (`kv`: its transfer parameters, with the ticket);
    returns (tensor, bytes received)."""
    request_id = kv.request_id
    block_shape = layout.shape[1:]
    buffer = bytearray(num_blocks * layout.block_bytes)
    received = 0
    stream = pool.stub(endpoint).ReadKv(worker_pb2.ReadKvRequest(request_id=request_id, kv=kv), timeout=timeout_s)
    async for chunk in stream:
        start = chunk.block_offset * layout.block_bytes
        if start + len(chunk.data) > len(buffer) or len(chunk.data) != chunk.num_blocks * layout.block_bytes:
            raise ValueError(f"KV chunk for {request_id} does not match the announced layout")
        buffer[start : start + len(chunk.data)] = chunk.data
        received += len(chunk.data)
    if received != len(buffer):
        raise ValueError(f"received {received} of {len(buffer)} KV bytes for {request_id}")
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    return flat.view(TORCH_DTYPES[layout.dtype]).view(num_blocks, *block_shape), received
