"""Incremental detokenization and stop strings.

Byte-level BPE tokens need not end on a character boundary, so text is produced only once the
decoded tail no longer ends in U+FFFD; decoding restarts from the previous read point so merges
with earlier tokens render correctly. With stop strings, the last (longest stop - 1) characters are
held back until the next token or the end, so a stop string that straddles tokens is never
partly streamed. Neither the returned deltas nor `text` ever include the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from triphase.common.models.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.text = ""
        self._emitted = 0
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_id: int) -> tuple[str, str | None]:
        """Add one token; returns (text that may be shown now, matched stop string or None)."""
        self._ids.append(token_id)
        before = self.tokenizer.decode(self._ids[self._prefix : self._read])
        after = self.tokenizer.decode(self._ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return "", None
        self._prefix, self._read = self._read, len(self._ids)
        old_len = len(self.text)
        self.text += after[len(before) :]
        if self.stop:
            start = max(0, old_len - self._hold)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                index, matched = min(hits)
                self.text = self.text[:index]
                return self.flush(), matched
        safe = max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : safe]
        self._emitted = safe
        return delta, None

    def prime(self, token_ids: Sequence[int]) -> None:
        """Continue a stream another detokenizer started: replay the tokens it was given (their text
        was already sent), so that a character split across the hand-over point, or text held back
        for stop strings, comes out exactly as one detokenizer would have produced it."""
        for token_id in token_ids:
            self.add(token_id)

    def flush(self) -> str:
        """Everything not yet returned (call once the request ends)."""
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta
