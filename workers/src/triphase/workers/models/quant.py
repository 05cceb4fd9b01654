"""4-bit weights kept packed: GGUF Q4_0 / Q4_1 blocks run as torch's int4 CPU matmul kernel.

A decode step at small batch is bound by the bytes of weights it reads. GGUF's Q4_0 and Q4_1 store
32 weights per block as 4-bit integers q with a scale d (and, for Q4_1, an offset m):
w = d * q + m (Q4_1) or d * (q - 8) (Q4_0). torch's `_weight_int4pack_mm_for_cpu` computes
x @ W^T with W = (q - 8) * scale + zero per group of 32 along the input dimension, so a GGUF block
maps onto it with scale = d and zero = m + 8d (Q4_1) or 0 (Q4_0): no re-quantization, only the
scales are rounded to bfloat16. That reads ~0.56 bytes per weight instead of 2 (bfloat16).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

GROUP = 32  # weights per GGUF block, and the int4 kernel's group size
Q4_0, Q4_1 = "Q4_0", "Q4_1"


@dataclasses.dataclass
class Q4Blocks:
    """Unpacked 4-bit weights of one [rows, cols] matrix: w = (q - 8) * scale + zero."""

    q: np.ndarray  # uint8 [rows, cols], values 0..15
    scale: np.ndarray  # float32 [rows, cols // GROUP]
    zero: np.ndarray  # float32 [rows, cols // GROUP]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        q = self.q.reshape(rows, cols // GROUP, GROUP).astype(np.float32)
        w = (q - 8.0) * self.scale[..., None] + self.zero[..., None]
        return w.reshape(rows, cols)

    def permute_rows(self, order: np.ndarray) -> Q4Blocks:
        return Q4Blocks(self.q[order], self.scale[order], self.zero[order])


def parse_gguf_q4(raw: np.ndarray, kind: str, rows: int, cols: int) -> Q4Blocks:
    """Split GGUF Q4_0/Q4_1 bytes ([rows, bytes_per_row] uint8) into q, scale and zero."""
    header = 4 if kind == Q4_1 else 2
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP, header + GROUP // 2)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., header:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, cols)  # low nibbles first
    if kind == Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8.0 * d
    else:
        zero = np.zeros_like(d)
    return Q4Blocks(q, d, zero)


def concat_rows(parts: list[Q4Blocks]) -> Q4Blocks:
    return Q4Blocks(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                    np.concatenate([p.zero for p in parts]))


class Int4Linear:
    """y = x @ W^T with W held as packed int4 (x and y bfloat16)."""

    def __init__(self, blocks: Q4Blocks) -> None:
        self.out_features = blocks.shape[0]
        q = torch.from_numpy(blocks.q.astype(np.int32))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_zeros = np.stack([blocks.scale.T, blocks.zero.T], axis=-1)  # [cols / GROUP, rows, 2]
        self.scales_zeros = torch.from_numpy(np.ascontiguousarray(scales_zeros)).to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
