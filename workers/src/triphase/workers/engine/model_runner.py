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
from triphase.workers.engine.request import Request
from triphase.workers.engine.sampler import Sample, sample
from triphase.workers.engine.scheduler import ScheduledRequest, SchedulerOutput
from triphase.workers.models.attention import AttentionBatch, PrefillSeq
from triphase.workers.models.decoder import DecoderModel

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU = torch.device("cpu")


def allocate_kv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device = _CPU) -> torch.Tensor:
    """A zeroed KV tensor. On a GPU, one allocation of device memory. On the CPU, on transparent huge
    pages where the kernel offers them on request (THP `madvise` mode): a NIXL READ between workers on
    one host is a cross-process copy that pins the source's pages, and 2 MiB pages mean 512 times
    fewer of them."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP on this platform: normal pages
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype, count=math.prod(shape)).view(shape)  # holds `memory`


class ModelRunner:
    """Runs on the model's device. Per step it copies the step's indices to the device once and reads
    back once (the sampled ids, or the logits when a row samples on the host: see sampler.py)."""

    def __init__(self, model: DecoderModel | None, layout: KvLayout) -> None:
        self.model = model
        self.layout = layout
        self.device = model.device if model is not None else _CPU
        self.kv_cache = allocate_kv(layout.shape, TORCH_DTYPES[layout.dtype], self.device)
        self.generator = torch.Generator().manual_seed(0)
        self.stop_ids: frozenset[int] = frozenset()  # the model's EOS ids (min_tokens masks them): the engine's
        self._prompt_rows: list[tuple[Request, int, int, int]] = []  # the step's prompt logprob rows (_forward)

    def _upload(self, *arrays: list[int]) -> list[torch.Tensor]:
        """Host lists of ints -> int64 tensors on the device, through one (pinned, asynchronous) copy."""
        flat = torch.tensor([x for a in arrays for x in a], dtype=torch.long)
        if self.device.type != "cpu":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        return list(flat.split([len(a) for a in arrays]))

    # ------------------------------------------------------------------ a step
    def execute(self, output: SchedulerOutput) -> dict[str, Sample]:
        """Run the scheduled tokens; returns a sample for every request whose step reaches its end."""
        logits, sampled_items = self._forward(output.scheduled, all_logits=False)
        if self._prompt_rows:
            logits = self._record_prompt_logprobs(logits)
        if not sampled_items:
            return {}
        samples = sample(logits, [i.request for i in sampled_items], self.generator, self.stop_ids)
        return {i.request.request_id: s for i, s in zip(sampled_items, samples, strict=True)}

    def _record_prompt_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Append the prompt logprobs this step computed to their requests; returns the sampled rows."""
        keep = torch.ones(logits.shape[0], dtype=torch.bool)
        for request, row, start, end in self._prompt_rows:
            keep[row : row + end - start] = False
            lp = torch.log_softmax(logits[row : row + end - start].float(), dim=-1).cpu()
            n = request.sampling.prompt_logprobs or 0
            top = torch.topk(lp, n) if n else None
            for k, position in enumerate(range(start, end)):
                if position + 1 != len(request.prompt_logprobs):  # computed before (preempted, recomputed)
                    continue
                token = request.token_ids[position + 1]
                entry = {token: float(lp[k, token])}
                if top is not None:
                    for v, i in zip(top.values[k].tolist(), top.indices[k].tolist(), strict=True):
                        entry.setdefault(int(i), float(v))
                request.prompt_logprobs.append(entry)
        return logits[keep.to(logits.device)]

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
        tables: list[list[int]] = []  # per prefill chunk: the blocks of its context (empty without one)
        image_rows: list[int] = []
        image_parts: list[torch.Tensor] = []
        # (request, first logits row, first position, end position): prompt positions whose logits give
        # the next prompt token's logprob (requests that asked for prompt logprobs)
        self._prompt_rows = []
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
                prefills.append(PrefillSeq(offset, offset + n, start, None))
                tables.append(list(item.block_ids[: -(-(start + n) // bs)]) if start > 0 else [])
            if all_logits:
                logits_rows.extend(range(offset, offset + n))
                continue
            end = min(start + n, request.num_prompt_tokens - 1)
            if request.sampling.prompt_logprobs is not None and start < end:
                self._prompt_rows.append((request, len(logits_rows), start, end))
                logits_rows.extend(range(offset, offset + end - start))
            if item.samples:
                logits_rows.append(len(tokens) - 1)
                sampled_items.append(item)

        # Every index the step needs, in one host-to-device copy: tokens, positions, write slots,
        # logits rows, image rows, the decode table and context lengths, then each prefill's table.
        width = -(-max(decode_ctx) // bs) if decode_ctx else 0
        decode_rows = [x for t in decode_tables for x in t[:width] + [t[0]] * (width - min(width, len(t)))]
        (tokens_t, positions_t, blocks_t, slots_t, logits_t, image_rows_t, table_t, ctx_t,
         *prefill_tables) = self._upload(tokens, positions, write_blocks, write_slots, logits_rows, image_rows,
                                          decode_rows, decode_ctx, *tables)
        for seq, table in zip(prefills, prefill_tables, strict=True):
            seq.table = table if seq.context_len else None
        batch = AttentionBatch(write_blocks=blocks_t, write_slots=slots_t, num_decode=len(decode_ctx),
                               decode_table=None, decode_len=0, decode_mask=None, prefills=prefills)
        if decode_ctx:
            batch.decode_table = table_t.view(len(decode_ctx), width)
            batch.decode_len = decode_ctx[0]
            if len(decode_ctx) > 1:
                pos = torch.arange(width * bs, device=self.device)
                batch.decode_mask = (pos.unsqueeze(0) < ctx_t.unsqueeze(1))[:, None, None, :]
                batch.decode_lens = ctx_t
        assert self.model is not None, "a simulated runner overrides execute()"
        written = None
        if image_rows:
            written = (image_rows_t, torch.cat(image_parts).to(self.device, non_blocking=True))
        logits = self.model.forward(tokens_t, positions_t, batch, self.kv_cache, logits_t, written,
                                    max_position=max(positions))
        return logits, sampled_items

    # ------------------------------------------------------------------ KV export / import
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Host copy of the given blocks: [len(block_ids), *block shape] (pinned when the KV is on a GPU:
        the gRPC stream stages through it)."""
        out = torch.empty((len(block_ids), *self.layout.shape[1:]), dtype=self.kv_cache.dtype,
                          pin_memory=self.device.type != "cpu")
        for src, dst, n in transfer_plan(block_ids, range(len(block_ids))):  # one memcpy per contiguous run
            out[dst : dst + n].copy_(self.kv_cache[src : src + n])
        return out

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        expected = (len(block_ids), *self.layout.shape[1:])
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        data = data.to(self.kv_cache.dtype).to(self.device)
        for src, dst, n in transfer_plan(range(len(block_ids)), block_ids):  # one memcpy per contiguous run
            self.kv_cache[dst : dst + n].copy_(data[src : src + n])

    def copy_blocks_from(self, source: ModelRunner, src_ids: list[int], dst_ids: list[int]) -> None:
        """Block copy between two runners in one process, one slice copy per contiguous run."""
        for s, d, n in transfer_plan(src_ids, dst_ids):
            self.kv_cache[d : d + n].copy_(source.kv_cache[s : s + n])
