"""Grammars for structured output: what the router builds from a request and the workers match.

The wire format is llguidance's grammar (a JSON document naming a JSON schema, a Lark grammar or a
regex): the router builds it from `response_format` or `tools` and validates it, once per distinct
grammar, before any work is done; a worker compiles it into a matcher (engine/grammar.py), cached by
the grammar's hash. Both sides apply the same `limits()`, so a grammar the router accepted compiles on
every worker, and compiling one costs bounded time whatever a client sends.

Why llguidance (1.9.1) rather than xgrammar (0.2.8): on this CPU, for a 20-field schema, llguidance
computes a step's token masks in 0.044 ms at batch 1 and 1.26 ms at batch 32 (its executor, two cores),
xgrammar in 0.11 ms and 3.4 ms (BENCHMARKS.md "Structured output", benchmarks/structured.py); llguidance
compiled that schema in ~1 ms, xgrammar in ~70 ms; and llguidance depends on nothing, where xgrammar
pulls in transformers and triton.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

MAX_SCHEMA_BYTES = 64 << 10  # a JSON schema (or regex, or Lark grammar) as the client sent it
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in a schema
# How JSON is laid out under a grammar: compact separators, no free whitespace (whitespace the model may
# emit without end is the classic way a constrained decode never finishes).
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ",",
                                     "key_separator": ":"}


class GrammarError(ValueError):
    """A schema or grammar that is refused: too large, too deep, or not compilable."""


def limits() -> llguidance.LLParserLimits:
    """Compile-time and per-token work, bounded below llguidance's defaults (a step's mask must not
    stall the batch); errors name no part of the grammar (verbose ones would echo it into logs)."""
    return llguidance.LLParserLimits(initial_lexer_fuel=500_000, step_lexer_fuel=200_000, step_max_items=50_000,
                                     max_lexer_states=100_000, max_grammar_size=200_000, verbose_errors=False)


def digest(grammar: str) -> str:
    return hashlib.sha256(grammar.encode()).hexdigest()


def _too_deep(node: Any, budget: int) -> bool:
    """Whether a JSON document nests deeper than `budget` levels (stops at the first path that does)."""
    if isinstance(node, dict | list):
        if budget == 0:
            return True
        return any(_too_deep(child, budget - 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def check_schema(schema: Any) -> str:
    """The schema as compact JSON, once its depth and size are within bounds."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be a JSON object")
    # Two levels of the JSON document per level of the schema ("properties" -> a property's schema).
    if _too_deep(schema, 2 * MAX_SCHEMA_DEPTH):
        raise GrammarError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    text = json.dumps(schema, separators=(",", ":"))  # key order kept: objects follow the schema's order
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the JSON schema has {len(text)} bytes; at most {MAX_SCHEMA_BYTES}")
    return text


def json_schema(schema: Any) -> str:
    """A grammar for JSON that validates against `schema` (a dict)."""
    text = check_schema(schema)
    return validated(llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS))


def json_object() -> str:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> str:
    if len(pattern.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the regular expression has more than {MAX_SCHEMA_BYTES} bytes")
    return validated(llguidance.LLMatcher.grammar_from_regex(pattern))


def lark(source: str) -> str:
    if len(source.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the grammar has more than {MAX_SCHEMA_BYTES} bytes")
    return validated(llguidance.LLMatcher.grammar_from_lark(source))


@functools.lru_cache(maxsize=256)
def _validate(grammar: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None, limits=limits())
    return messages[0] if is_error else ""


def validated(grammar: str) -> str:
    """`grammar`, if it compiles within LIMITS (checked once per distinct grammar); else GrammarError."""
    error = _validate(grammar)
    if error:
        raise GrammarError(f"the grammar cannot be used: {error.splitlines()[0][:300]}")
    return grammar
