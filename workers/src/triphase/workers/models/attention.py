"""Paged attention over the worker's one KV tensor.

The KV tensor is block-major: `kv[block, layer, k_or_v, slot, kv_head, head_dim]`, so one block
is one contiguous byte range holding every layer (see `engine/kv_layout.py`). For a step the
model runner hands over `AttentionBatch`: where each new token's K/V goes (block, slot) and, per
sequence, which blocks to read back. Tokens are ordered decodes first (one token per sequence,
attended as one padded batch), then prefill chunks (one SDPA call each).

On the CPU, decode attention runs in float32: torch's CPU SDPA kernel for a single bfloat16 query
row is 7-12x slower than the float32 one (measured: 1.2 ms vs 0.16 ms per layer at batch 8, 300
tokens), and the gathered K/V are copied anyway, so the conversion rides along with that copy. On a
GPU it runs in the compute dtype (the fused kernels want 16-bit inputs, and the gather would double
its bytes). Every tensor made here is made on the KV tensor's device; nothing is read back.

A sliding-window layer (`window` keys, the query's own included: transformers' `kv > q - window`)
masks the keys that fell out of its window; the cache still holds them (the global layers of the
same model read the same blocks).
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
    table: torch.Tensor | None  # block ids covering context_len + n tokens (None when context_len == 0)
    _masks: dict[int | None, torch.Tensor] = dataclasses.field(default_factory=dict)

    def mask(self, window: int | None, device: torch.device) -> torch.Tensor:
        """[n, context_len + n]: query i (absolute position context_len + i) sees keys 0 .. context_len + i,
        or only the last `window` of them. Made once per step for every layer with that window."""
        found = self._masks.get(window)
        if found is None:
            n = self.end - self.start
            found = torch.ones(n, self.context_len + n, dtype=torch.bool, device=device).tril(diagonal=self.context_len)
            if window is not None:
                found = found.triu(diagonal=self.context_len - window + 1)
            self._masks[window] = found
        return found


@dataclasses.dataclass
class AttentionBatch:
    write_blocks: torch.Tensor  # [T] block id per new token
    write_slots: torch.Tensor  # [T] slot inside the block
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_table: torch.Tensor | None  # [B, nb] block ids, padded with any valid id
    decode_len: int  # tokens to attend for a single decode (B == 1); else see decode_mask
    decode_mask: torch.Tensor | None  # [B, 1, 1, nb * block_size] True = attend (B > 1)
    prefills: list[PrefillSeq]
    decode_lens: torch.Tensor | None = None  # [B] tokens each decode attends (B > 1; for sliding windows)
    _window_masks: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def decode_window_mask(self, window: int) -> torch.Tensor:
        """decode_mask narrowed to each sequence's last `window` keys (made once per step)."""
        mask = self._window_masks.get(window)
        if mask is None:
            assert self.decode_mask is not None and self.decode_lens is not None
            keys = torch.arange(self.decode_mask.shape[-1], device=self.decode_mask.device)
            recent = keys.unsqueeze(0) >= (self.decode_lens - window).unsqueeze(1)
            mask = self._window_masks[window] = self.decode_mask & recent[:, None, None, :]
        return mask


def gather_blocks(layer_kv: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K and V of whole blocks: [2, B, KVH, nb * block_size, D] from table [B, nb], in `dtype`.

    One index_select of whole blocks (a memcpy per block) and one copy that both reorders and
    converts; far cheaper than per-token advanced indexing for long contexts."""
    batch, nb = table.shape
    _, _, size, kv_heads, dim = layer_kv.shape
    blocks = layer_kv.index_select(0, table.reshape(-1)).view(batch, nb, 2, size, kv_heads, dim)
    ordered = torch.empty((2, batch, kv_heads, nb, size, dim), dtype=dtype, device=layer_kv.device)
    ordered.copy_(blocks.permute(2, 0, 4, 1, 3, 5))
    return ordered.view(2, batch, kv_heads, nb * size, dim)


def paged_attention(q: torch.Tensor, kv: torch.Tensor, layer_kv: torch.Tensor, batch: AttentionBatch,
                    scale: float, window: int | None = None) -> torch.Tensor:
    """q [T, H, D] and kv [T, 2, KVH, D] for the new tokens; layer_kv is kv_cache[:, layer]
    ([N, 2, S, KVH, D]). Writes the new K/V into the cache, attends (to the last `window` keys of
    each query when set), and returns [T, H, D]."""
    layer_kv[batch.write_blocks, :, batch.write_slots] = kv
    outputs: list[torch.Tensor] = []
    nd = batch.num_decode
    if nd:
        assert batch.decode_table is not None
        attend_dtype = torch.float32 if layer_kv.device.type == "cpu" else q.dtype
        past = gather_blocks(layer_kv, batch.decode_table, attend_dtype)
        kd, vd = past[0], past[1]
        mask = batch.decode_mask
        if mask is None:  # a single sequence: attend to exactly its tokens
            first = 0 if window is None else max(0, batch.decode_len - window)
            kd, vd = kd[:, :, first : batch.decode_len], vd[:, :, first : batch.decode_len]
        elif window is not None:
            mask = batch.decode_window_mask(window)
        qd = q[:nd].unsqueeze(2).to(attend_dtype)  # [B, H, 1, D]
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        outputs.append(out.squeeze(2).to(q.dtype))
    for seq in batch.prefills:
        qs = q[seq.start:seq.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        n = seq.end - seq.start
        if seq.context_len == 0:
            new = kv[seq.start:seq.end]
            ks = new[:, 0].transpose(0, 1).unsqueeze(0)
            vs = new[:, 1].transpose(0, 1).unsqueeze(0)
            if window is None or n <= window:
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seq.mask(window, q.device),
                                                     scale=scale, enable_gqa=True)
        else:
            assert seq.table is not None
            total = seq.context_len + n
            past = gather_blocks(layer_kv, seq.table.unsqueeze(0), q.dtype)
            ks, vs = past[0][:, :, :total], past[1][:, :, :total]
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seq.mask(window, q.device), scale=scale,
                                                 enable_gqa=True)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

