"""Structured output on a worker: a grammar (common/grammar.py) becomes a matcher per request.

A matcher follows the request's output token by token and gives, before each draw, the set of
tokens the grammar allows next (a bitmask the sampler applies). Compiling is paid once per distinct
grammar per worker: `Grammars` keeps a fresh matcher per grammar hash (LRU) and hands out copies.

Across the hand-off and after a failover the constraint continues, not restarts: the prefill
worker draws the first token under the grammar; the decode worker (or one that resumes the request
later) copies the cached matcher and advances it over the output tokens so far — a pass over the
tokens, no recompilation — and draws the next token under the same state a single process would be
in. A token the grammar does not allow there (a hand-off that lies) is an INVALID_ARGUMENT.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import llguidance
import numpy as np

from triphase.common import grammar as common_grammar
from triphase.common.models.tokenizer import Tokenizer

MAX_CACHED = 128


def unpack(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """llguidance's token bitmasks (rows of little-endian bits, as bytes) as 0/1 per token id: [rows, vocab]."""
    return np.unpackbits(bitmask, axis=1, bitorder="little")[:, :vocab_size]


class Grammars:
    """The engine's grammar compiler: its tokenizer as llguidance sees it (built on first use,
    ~0.2 s) and the compiled grammars, most recently used kept."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(set(eos_token_ids))
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()  # the engine thread compiles; the gRPC threads may check
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            try:
                self._lltok = llguidance.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self._vocab_size,
                                                     eos_token=self._eos)
            except ValueError as exc:  # a tokenizer without a decoder llguidance knows
                raise ValueError(f"structured output is not available for this model's tokenizer ({exc})") from None
        return self._lltok

    def matcher(self, grammar: str, output: Sequence[int] = ()) -> Constraint:
        """A matcher for `grammar` advanced over `output` (tokens generated before, elsewhere);
        ValueError for a grammar that does not compile or output it does not allow."""
        key = common_grammar.digest(grammar)
        with self._lock:
            template = self._cache.get(key)
            if template is None:
                template = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0,
                                                limits=common_grammar.limits())
                if template.is_error():
                    raise ValueError(f"the grammar cannot be used: {template.get_error().splitlines()[0][:300]}")
                self._cache[key] = template
                self.compiled += 1
                while len(self._cache) > MAX_CACHED:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            constraint = Constraint(template.deep_copy())
        for token in output:
            if not constraint.consume(token):
                raise ValueError("the output so far does not follow the request's grammar")
        return constraint


class Constraint:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def consume(self, token: int) -> bool:
        """Advance over a drawn token; False when the grammar does not allow it (the matcher is then
        in its error state)."""
        return bool(self.matcher.consume_token(token))

    def allowed(self, vocab_size: int) -> np.ndarray:
        """The token ids the grammar allows next, ascending (one matcher; a batch: sampler.py)."""
        return np.flatnonzero(unpack(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)[None], vocab_size))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def failed(self) -> bool:
        return bool(self.matcher.is_error())
