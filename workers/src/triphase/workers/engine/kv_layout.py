"""The byte layout of the worker's one KV tensor, shared by the runner and the KV connectors.

Shape `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`, contiguous, block-major:
block b occupies bytes `[b * block_bytes, (b + 1) * block_bytes)` of the tensor and holds K then V
for every layer. So a run of consecutive block ids is one contiguous byte range, and a transfer
of n blocks costs as many operations as there are runs, not n * layers. Pure Python: connectors
that only describe transfers (the router, NIXL descriptors) need no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class KvLayout:
    num_blocks: int
    num_layers: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16" or "float16"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def block_range(self, block_id: int) -> tuple[int, int]:
        """Byte offset and length of one block inside the tensor."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} outside 0..{self.num_blocks - 1}")
        return block_id * self.block_bytes, self.block_bytes

    def compatible_with(self, other: KvLayout) -> bool:
        """Whether blocks can be copied byte for byte between the two tensors."""
        return (self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype) == (
            other.num_layers, other.block_size, other.num_kv_heads, other.head_dim, other.dtype)


def contiguous_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Split block ids into maximal runs of consecutive ids: [(first_id, count), ...] in order."""
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


def transfer_plan(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Pair source and destination blocks into copies that are contiguous on both sides:
    [(src_first, dst_first, count), ...]. Each entry is one transfer of count * block_bytes."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    plan: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if plan and plan[-1][0] + plan[-1][2] == s and plan[-1][1] + plan[-1][2] == d:
            plan[-1] = (plan[-1][0], plan[-1][1], plan[-1][2] + 1)
        else:
            plan.append((s, d, 1))
    return plan
