"""Logprobs in OpenAI's two shapes: chat's `logprobs.content` entries and completions' parallel lists.

The workers send, per generated token, {token id: logprob} with the chosen token first and then the
top N (the chosen one once, whether or not it is among them): the top-N list is the N likeliest of
those. Values are the model's raw distribution (see the workers' sampler.py); a logprob too small for
float32 is reported as -9999.0, as vLLM does, since JSON has no -Infinity.

A token's text is its exact bytes decoded as UTF-8 (a token that ends inside a character shows the
replacement character there; `bytes` has the exact bytes), built with the grammar engine's tokenizer,
which knows every tokenizer family's byte encoding. A tokenizer it cannot read (one without a decoder,
e.g. a word-level test tokenizer) falls back to decoding each token alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import llguidance

from triphase.common.models.tokenizer import Tokenizer

FLOOR = -9999.0


class TokenTexts:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @functools.cached_property
    def _lltok(self) -> llguidance.LLTokenizer | None:  # ~0.2 s, on the first request that asks for logprobs
        try:
            return llguidance.LLTokenizer(self._tokenizer.backend.to_str(), slices=[])
        except ValueError:  # "can't determine decoder type"
            return None

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 (one instance per router, for its lifetime)
    def bytes_of(self, token_id: int) -> bytes:
        if self._lltok is None:
            return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()
        return bytes(self._lltok.decode_bytes([token_id]))

    def text(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _top(row: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(row.items(), key=lambda item: -item[1])[:n]


def chat_entries(texts: TokenTexts, token_ids: Sequence[int], rows: Sequence[dict[int, float]], n: int,
                 ) -> list[dict[str, Any]]:
    """`logprobs.content` entries of a chat completion (or chunk), one per token."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": texts.text(token), "logprob": _value(logprob), "bytes": list(texts.bytes_of(token))}

    out = []
    for token, row in zip(token_ids, rows, strict=True):
        item = entry(token, row[token])
        item["top_logprobs"] = [entry(t, lp) for t, lp in _top(row, n)]
        out.append(item)
    return out


class CompletionLogprobs:
    """Completions' `logprobs` object, built incrementally (text offsets run across a stream's chunks)."""

    def __init__(self, texts: TokenTexts, n: int, offset: int = 0) -> None:
        self.texts = texts
        self.n = n
        self.offset = offset  # characters of text before the next token (the echoed prompt, earlier tokens)

    def add_prompt(self, token_ids: Sequence[int], rows: Sequence[dict[int, float]]) -> dict[str, Any]:
        """The prompt's tokens (echo): the first has no logprob (None), as OpenAI reports it."""
        out = self.add(token_ids[1:], rows[1:]) if len(token_ids) > 1 else \
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        first = self.texts.text(token_ids[0])
        out["tokens"].insert(0, first)
        out["token_logprobs"].insert(0, None)
        out["top_logprobs"].insert(0, None)
        out["text_offset"] = [0, *(offset + len(first) for offset in out["text_offset"])]
        self.offset += len(first)
        return out

    def add(self, token_ids: Sequence[int], rows: Sequence[dict[int, float]]) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for token, row in zip(token_ids, rows, strict=True):
            text = self.texts.text(token)
            tokens.append(text)
            values.append(_value(row[token]))
            tops.append({self.texts.text(t): _value(lp) for t, lp in _top(row, self.n)})
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Completions' logprobs of several deltas as one object."""
    return {key: [x for part in parts for x in part[key]]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
