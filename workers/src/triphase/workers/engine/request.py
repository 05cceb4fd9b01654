"""A request as the engine sees it: token ids, progress, and why it ended."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from typing import Any

from triphase.common.block_hash import ImageSpan
from triphase.workers.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its KV was freed and will be recomputed
    PREFILLED = "prefilled"  # prefill-only request done; its blocks stay pinned for export
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """`token_ids` is prompt + output; `num_computed_tokens` of them have KV in the cache.

    Invariant: 0 <= num_computed_tokens <= num_tokens. When a step brings num_computed_tokens up
    to num_tokens, the step also sampled the next token, which is appended.

    `images` are the prompt's image placeholder runs, in order and disjoint; `image_embeds` holds
    their embeddings (tensors, one [length, hidden] per image, kept until the request ends: a
    preempted request computes them into the KV again).
    """

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
                 *, prefill_only: bool = False, arrival_time: float | None = None,
                 images: Sequence[ImageSpan] = (), image_embeds: Sequence[object] = ()) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.sampling = sampling
        self.prefill_only = prefill_only
        self.images = tuple(images)
        self.image_embeds = tuple(image_embeds)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.num_preemptions = 0
        self.output_offset = 0  # outputs generated elsewhere before this request resumed here
        self.status = RequestStatus.WAITING
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.logprobs: list[dict[int, float]] = []  # per output token: {token_id: logprob}
        # per prompt token, when asked for: {token id: logprob}, the prompt's token first then the top-N;
        # the first token has none ({}); filled as chunks of the prompt are computed
        self.prompt_logprobs: list[dict[int, float]] = [{}] if sampling.prompt_logprobs is not None else []
        self.stop_reason: str | int | None = None
        self.constraint: Any = None  # engine/grammar.Constraint: where its output is in its grammar
        self.parent_id = request_id  # the request a choice belongs to (its own id for choice 0)
        self.index = 0  # which choice of the parent's n this is

    @property
    def recomputable(self) -> bool:
        """Its KV can be computed again from what it holds (not so for images without embeddings)."""
        return len(self.image_embeds) == len(self.images)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"{self.status.value})")
