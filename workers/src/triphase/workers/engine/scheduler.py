"""Continuous batching with chunked prefill and preemption by recomputation.

Each step has a token budget (`max_num_batched_tokens`). Running requests that are decoding get
their one token first, so a long prompt never stalls them (Sarathi-Serve); partially prefilled
requests continue next; waiting requests are admitted with what is left, their prompts cut into
chunks. When the KV pool runs dry, the most recently admitted running request is preempted: its
blocks are freed and it rejoins the front of the waiting queue, to be recomputed (prompt + output
so far) when there is room again. The scheduler never touches tensors.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from triphase.workers.engine.kv_cache_manager import KVCacheManager, cdiv
from triphase.workers.engine.request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledRequest:
    """One request's share of a step, fixed when scheduled (the request itself moves on)."""

    request: Request
    num_new_tokens: int
    block_ids: list[int]
    start: int = 0  # position of the first token computed in this step
    samples: bool = False  # the step reaches the end of the request's tokens, so it samples one

    @classmethod
    def of(cls, request: Request, num_new_tokens: int, block_ids: list[int]) -> ScheduledRequest:
        start = request.num_computed_tokens
        return cls(request, num_new_tokens, block_ids, start, start + num_new_tokens == request.num_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # decodes (one token each) first, then prefill chunks
    preempted: list[str]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    watermark_blocks: int = 0  # free blocks kept back when admitting new requests


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pinned: dict[str, Request] = {}  # prefill-only requests whose blocks await export
        self.num_preemptions = 0

    # ------------------------------------------------------------------ admission
    def check(self, request: Request) -> None:
        """Reject what could never run: raises ValueError with the reason."""
        if request.num_prompt_tokens >= self.max_len:
            raise ValueError(f"prompt has {request.num_prompt_tokens} tokens; at most {self.max_len - 1} fit "
                             f"(context length {self.config.max_model_len}, KV cache {self.kv_capacity} tokens)")

    @property
    def kv_capacity(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    @property
    def max_len(self) -> int:
        """Longest sequence (prompt + output) a request can reach: a request alone must always fit, or
        it would preempt itself forever; one that reaches this ends with finish reason "length"."""
        return min(self.config.max_model_len, self.kv_capacity)

    def add(self, request: Request) -> None:
        self.check(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A request whose KV is already in the cache (imported); it decodes from the next step."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledRequest] = []
        prefills: list[ScheduledRequest] = []
        preempted: list[str] = []
        scheduled_ids: set[str] = set()

        # Running requests: decodes first, then continuing prefills.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for request in order:
            if request.status is not RequestStatus.RUNNING or budget == 0:
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim.request_id in scheduled_ids:  # drop the work it was given this step
                    scheduled_ids.discard(victim.request_id)
                    for items in (decodes, prefills):
                        for item in [i for i in items if i.request is victim]:
                            items.remove(item)
                            budget += item.num_new_tokens
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            item = ScheduledRequest.of(request, num_new, self.kv.block_ids(request.request_id))
            (decodes if remaining == 1 else prefills).append(item)
            scheduled_ids.add(request.request_id)
            budget -= num_new

        # Waiting requests, oldest first, unless this step already had to preempt.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            free_after = self.kv.num_free_blocks - cdiv(num_hit + num_new, self.kv.block_size)
            if free_after < self.config.watermark_blocks and self.running:
                break
            if not self.kv.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            prefills.append(ScheduledRequest.of(request, num_new, self.kv.block_ids(request.request_id)))
            scheduled_ids.add(request.request_id)
            budget -= num_new
        return SchedulerOutput(decodes + prefills, preempted)

    def _pick_victim(self, scheduled_ids: set[str]) -> Request:
        """The most recently admitted running request not yet scheduled this step; failing that, the
        most recent one at all (its already scheduled work is dropped from this step). Requests that
        can recompute their KV go first: an imported request with images has no embeddings here."""
        candidates = sorted(reversed(self.running), key=lambda r: not r.recomputable)
        for request in candidates:
            if request.request_id not in scheduled_ids:
                return request
        return candidates[0]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance requests after the model ran; append sampled tokens. Returns requests that got a
        new token (callers then check stop conditions and call `finish`)."""
        advanced = []
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted or aborted after being scheduled
            request.num_computed_tokens += item.num_new_tokens
            self.kv.cache_computed_blocks(request)
            self.kv.drop_out_of_window(request)
            token = sampled.get(request.request_id)
            if token is not None:
                request.append_token(token)
                advanced.append(request)
        return advanced

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request. Prefill-only requests keep their blocks pinned until `release`."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if status is RequestStatus.PREFILLED:
            request.status = status
            self.pinned[request.request_id] = request
            return
        request.status = status
        self.kv.free(request.request_id)

    def release(self, request_id: str) -> bool:
        """Free the blocks of a pinned (prefilled, exported) request. False if it was not pinned."""
        request = self.pinned.pop(request_id, None)
        if request is None:
            return False
        self.kv.free(request_id)
        return True

    def find(self, request_id: str) -> Request | None:
        for request in self.running:
            if request.request_id == request_id:
                return request
        for request in self.waiting:
            if request.request_id == request_id:
                return request
        return self.pinned.get(request_id)
