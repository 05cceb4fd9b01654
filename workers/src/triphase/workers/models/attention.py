"""Paged attention over the worker's one KV tensor.

The KV tensor is block-major: `kv[block, layer, k_or_v, slot, kv_head, head_dim]`, so one block
is one contiguous byte range holding every layer (see `engine/kv_layout.py`). For a step the
model runner hands over `AttentionBatch`: where each new token's K/V goes (block, slot) and, per
sequence, which (block, slot) pairs to read back. Tokens are ordered decodes first (one token per
sequence, attended as one padded batch), then prefill chunks (one SDPA call each).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class PrefillSeq:
    start: int  # first token of this chunk in the flat batch
    end: int
    context_len: int  # tokens already in the cache before this chunk
    gather_blocks: torch.Tensor | None  # [context_len + n] block ids (None when context_len == 0)
    gather_slots: torch.Tensor | None


@dataclasses.dataclass
class AttentionBatch:
    write_blocks: torch.Tensor  # [T] block id per new token
    write_slots: torch.Tensor  # [T] slot inside the block
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_blocks: torch.Tensor | None  # [B, Lmax]
    decode_slots: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] True = attend
    prefills: list[PrefillSeq]


def paged_attention(q: torch.Tensor, kv: torch.Tensor, layer_kv: torch.Tensor, batch: AttentionBatch,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] and kv [T, 2, KVH, D] for the new tokens; layer_kv is kv_cache[:, layer]
    ([N, 2, S, KVH, D]). Writes the new K/V into the cache, attends, and returns [T, H, D]."""
    layer_kv[batch.write_blocks, :, batch.write_slots] = kv
    outputs: list[torch.Tensor] = []
    nd = batch.num_decode
    if nd:
        assert batch.decode_blocks is not None and batch.decode_slots is not None
        past = layer_kv[batch.decode_blocks, :, batch.decode_slots]  # [B, L, 2, KVH, D]
        kd = past[:, :, 0].transpose(1, 2)  # [B, KVH, L, D]
        vd = past[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), kd, vd, attn_mask=batch.decode_mask,
                                             scale=scale, enable_gqa=True)
        outputs.append(out.squeeze(2))
    for seq in batch.prefills:
        qs = q[seq.start:seq.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if seq.context_len == 0:
            new = kv[seq.start:seq.end]
            ks = new[:, 0].transpose(0, 1).unsqueeze(0)
            vs = new[:, 1].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            assert seq.gather_blocks is not None and seq.gather_slots is not None
            past = layer_kv[seq.gather_blocks, :, seq.gather_slots]  # [L, 2, KVH, D]
            ks = past[:, 0].transpose(0, 1).unsqueeze(0)
            vs = past[:, 1].transpose(0, 1).unsqueeze(0)
            n = seq.end - seq.start
            # Query i (absolute position context_len + i) sees keys 0 .. context_len + i.
            mask = torch.ones(n, seq.context_len + n, dtype=torch.bool).tril(diagonal=seq.context_len)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
