"""The torch side of a step: owns the one KV tensor, builds model inputs from a SchedulerOutput,
runs the model and samples.

Nothing here decides what runs; the scheduler did. Block and slot indices are computed with
tensor ops so a batch of 64 long decodes costs a handful of torch calls, not a Python loop per
token.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from typing import cast

import torch

from triphase.workers.engine.kv_layout import KvLayout, transfer_plan
from triphase.workers.engine.multimodal import overlapping_rows
from triphase.workers.engine.sampler import Sample, sample
from triphase.workers.engine.scheduler import ScheduledRequest, SchedulerOutput
from triphase.workers.models.attention import AttentionBatch, PrefillSeq
from triphase.workers.models.llama import LlamaModel

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def allocate_kv(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed KV tensor on transparent huge pages where the kernel offers them on request (THP
    `madvise` mode): a NIXL READ between workers on one host is a cross-process copy that pins the
    source's pages, and 2 MiB pages mean 512 times fewer of them."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP on this platform: normal pages
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype, count=math.prod(shape)).view(shape)  # holds `memory`


class ModelRunner:
    def __init__(self, model: LlamaModel | None, layout: KvLayout) -> None:
        self.model = model
        self.layout = layout
        self.kv_cache = allocate_kv(layout.shape, TORCH_DTYPES[layout.dtype])
        self.generator = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------------ a step
    def execute(self, output: SchedulerOutput) -> dict[str, Sample]:
        """Run the scheduled tokens; returns a sample for every request whose step reaches its end."""
        logits, sampled_items = self._forward(output.scheduled, all_logits=False)
        if not sampled_items:
            return {}
        samples = sample(
            logits,
            [i.request.sampling for i in sampled_items],
            [i.request.num_output_tokens + i.request.output_offset for i in sampled_items],
            self.generator,
        )
        return {i.request.request_id: s for i, s in zip(sampled_items, samples, strict=True)}

    def logits(self, item: ScheduledRequest) -> torch.Tensor:
        """Logits for every token of one scheduled chunk (teacher forcing, scoring)."""
        return self._forward([item], all_logits=True)[0]

    def _forward(self, scheduled: list[ScheduledRequest], *, all_logits: bool,
                 ) -> tuple[torch.Tensor, list[ScheduledRequest]]:
        bs = self.layout.block_size
        tokens: list[int] = []
        positions: list[int] = []
        write_blocks: list[int] = []
        write_slots: list[int] = []
        logits_rows: list[int] = []
        sampled_items = []
        decode_ctx: list[int] = []
        decode_tables: list[list[int]] = []
        prefills: list[PrefillSeq] = []
        image_rows: list[int] = []
        image_parts: list[torch.Tensor] = []
        for item in scheduled:
            request, start, n = item.request, item.start, item.num_new_tokens
            offset = len(tokens)
            if request.image_embeds and start < request.num_prompt_tokens:
                embeds = cast("list[torch.Tensor]", request.image_embeds)  # the engine put tensors there
                new_rows, new_parts = overlapping_rows(request.images, embeds, start, n, offset)
                image_rows.extend(new_rows)
                image_parts.extend(new_parts)
            tokens.extend(request.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            for p in range(start, start + n):
                write_blocks.append(item.block_ids[p // bs])
                write_slots.append(p % bs)
            if n == 1 and start > 0 and not prefills:
                decode_ctx.append(start + 1)
                decode_tables.append(item.block_ids)
            else:
                table = None
                if start > 0:
                    table = torch.tensor(item.block_ids[: -(-(start + n) // bs)], dtype=torch.long)
                prefills.append(PrefillSeq(offset, offset + n, start, table))
            if all_logits:
                logits_rows.extend(range(offset, offset + n))
            elif item.samples:
                logits_rows.append(len(tokens) - 1)
                sampled_items.append(item)

        batch = AttentionBatch(
            write_blocks=torch.tensor(write_blocks, dtype=torch.long),
            write_slots=torch.tensor(write_slots, dtype=torch.long),
            num_decode=len(decode_ctx),
            decode_table=None, decode_len=0, decode_mask=None,
            prefills=prefills,
        )
        if decode_ctx:
            width = -(-max(decode_ctx) // bs)
            rows = [t[:width] + [t[0]] * (width - min(width, len(t))) for t in decode_tables]
            batch.decode_table = torch.tensor(rows, dtype=torch.long)
            batch.decode_len = decode_ctx[0]
            if len(decode_ctx) > 1:
                pos = torch.arange(width * bs)
                ctx = torch.tensor(decode_ctx)
                batch.decode_mask = (pos.unsqueeze(0) < ctx.unsqueeze(1))[:, None, None, :]
        assert self.model is not None, "a simulated runner overrides execute()"
        logits = self.model.forward(
            torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long), batch,
            self.kv_cache, torch.tensor(logits_rows, dtype=torch.long),
            (torch.tensor(image_rows, dtype=torch.long), torch.cat(image_parts)) if image_rows else None,
        )
        return logits, sampled_items

    # ------------------------------------------------------------------ KV export / import
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of the given blocks: [len(block_ids), *block shape]."""
        out = torch.empty((len(block_ids), *self.layout.shape[1:]), dtype=self.kv_cache.dtype)
        for src, dst, n in transfer_plan(block_ids, range(len(block_ids))):  # one memcpy per contiguous run
            out[dst : dst + n].copy_(self.kv_cache[src : src + n])
        return out

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        expected = (len(block_ids), *self.layout.shape[1:])
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        data = data.to(self.kv_cache.dtype)
        for src, dst, n in transfer_plan(range(len(block_ids)), block_ids):  # one memcpy per contiguous run
            self.kv_cache[dst : dst + n].copy_(data[src : src + n])

    def copy_blocks_from(self, source: ModelRunner, src_ids: list[int], dst_ids: list[int]) -> None:
        """Block copy between two runners in one process, one slice copy per contiguous run."""
        for s, d, n in transfer_plan(src_ids, dst_ids):
            self.kv_cache[d : d + n].copy_(source.kv_cache[s : s + n])
