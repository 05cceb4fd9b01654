"""Per-request sampling parameters, validated where they are made."""

from __future__ import annotations

import dataclasses
import math

from triphase.common.sampling import DEFAULT_MAX_TOKENS, MAX_CHOICES

# Temperatures below this are greedy: dividing logits by a denormal overflows them to inf, and the
# draw is numerically the argmax long before this point anyway.
GREEDY_BELOW = 1e-5
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string: each is checked against the tail of the text every token
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # entries, as OpenAI bounds it
MAX_MIN_TOKENS = 1 << 20
MAX_N = MAX_CHOICES
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # the protobuf's int64


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 (or anything below GREEDY_BELOW) means greedy. top_k <= 0 and top_p == 1 disable
    those filters. A seed makes a request's samples reproducible whatever else shares its batch.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0 = only the chosen token's)
    # top-N logprobs of every prompt token after the first (what evaluation harnesses score); such a
    # prompt is computed in full, not taken from the prefix cache (cached positions have no logits)
    prompt_logprobs: int | None = None
    # Penalties as vLLM and OpenAI define them: presence and frequency on the tokens generated so far
    # (by any worker: a resumed request counts the output it was resumed with), repetition on the
    # prompt's and the output's tokens (a positive logit divided by it, a negative one multiplied).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted by id
    min_tokens: int = 0  # EOS and the stop token ids are masked until this many tokens are generated
    grammar: str = ""  # an llguidance grammar (engine/grammar.py) the output must follow; "" = none
    # Choices: the prompt is computed once; once its first token is drawn, choices 1..n-1 fork from it,
    # sharing its full blocks (engine/kv_cache_manager.fork), each with seed common sampling.choice_seed(seed, i).
    n: int = 1

    def __post_init__(self) -> None:
        self._check_basic()
        for name, low, high in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
                                ("repetition_penalty", 0, 2), ("min_p", 0, 1)):
            value = getattr(self, name)
            if not math.isfinite(value) or not low <= value <= high or (name == "repetition_penalty" and value == 0):
                raise ValueError(f"{name} must be in {'(' if name == 'repetition_penalty' else '['}{low}, {high}], "
                                 f"got {value}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(self.logit_bias)}")
        if any(not math.isfinite(b) or not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not 0 <= self.min_tokens <= min(self.max_tokens, MAX_MIN_TOKENS):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {self.n}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def processed(self) -> bool:
        """Whether the logits are changed before the draw (beyond temperature and the top-k/p/min-p filters)."""
        return self.penalized or bool(self.logit_bias or self.min_tokens or self.grammar)

    def _check_basic(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be between 0 and 20, got {value}")
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
