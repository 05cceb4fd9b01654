"""What the router and the workers agree on about sampling: the default length of an output, how many
choices a request may ask for, and the seed each choice samples with (the router resumes a choice on
its own after a failure; the workers fork the choices from one prompt)."""

from __future__ import annotations

DEFAULT_MAX_TOKENS = 16  # an output's length when nobody says (OpenAI's completions default); a chat: the room left
MAX_CHOICES = 16  # n per request
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive indices spread over the whole range


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a seeded request: choice 0 keeps the request's, so n = 1 samples as
    before; the others get distinct seeds that depend on nothing but (seed, index), so a choice resumed
    on its own (after a failover) draws what it would have drawn."""
    if seed is None or index == 0:
        return seed
    value = (seed + index * _GOLDEN) & _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value
