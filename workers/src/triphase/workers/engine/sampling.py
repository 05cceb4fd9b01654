"""Per-request sampling parameters, validated where they are made."""

from __future__ import annotations

import dataclasses
import math

# Temperatures below this are greedy: dividing logits by a denormal overflows them to inf, and the
# draw is numerically the argmax long before this point anyway.
GREEDY_BELOW = 1e-5
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string: each is checked against the tail of the text every token
MAX_STOP_TOKEN_IDS = 64
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # the protobuf's int64


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 (or anything below GREEDY_BELOW) means greedy. top_k <= 0 and top_p == 1 disable
    those filters. A seed makes a request's samples reproducible whatever else shares its batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0 = only the chosen token's)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
