"""The grammar path as a property: any JSON schema the bounds admit yields output that validates against
it, whatever token the sampler picks among those the grammar allows; any other is refused (the router's
400) before a worker compiles anything."""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triphase.common import grammar
from triphase.common.models.files import load_tokenizer

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def tok():
    tokenizer, _ = load_tokenizer(None)
    return tokenizer, llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=list(tokenizer.eos_token_ids))


names = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
leaves = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 5000)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.builds(lambda xs: {"enum": xs}, st.lists(st.one_of(st.integers(-5, 5), names, st.booleans()),
                                                min_size=1, max_size=4, unique_by=lambda x: (type(x), x))),
)


def _object(props: dict, required_all: bool) -> dict:
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required_all:
        schema["required"] = sorted(props)
    return schema


schemas = st.recursive(leaves, lambda inner: st.one_of(
    st.builds(_object, st.dictionaries(names, inner, max_size=4), st.booleans()),
    st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra},
              inner, st.integers(0, 2), st.integers(0, 2)),
    st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
), max_leaves=12)


def generate(tok, compiled: str, rng: random.Random) -> str:
    """Draw tokens at random among those the grammar allows (the end as soon as it is allowed, half the time)."""
    tokenizer, lltok = tok
    matcher = llguidance.LLMatcher(lltok, compiled, limits=grammar.limits())
    assert not matcher.is_error(), matcher.get_error()
    eos = set(tokenizer.eos_token_ids)
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        if matcher.is_stopped():
            break
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[: lltok.vocab_size])
        assert len(allowed), "the grammar allowed no token"
        ending = [t for t in allowed if t in eos]
        token = ending[0] if ending and rng.random() < 0.5 else int(rng.choice(list(allowed)))
        assert matcher.consume_token(token)
        if token in eos:
            break
        out.append(token)
    else:
        pytest.fail(f"no end within {MAX_TOKENS} tokens")
    return tokenizer.decode(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_an_admitted_schema_yields_output_that_validates(tok, schema, seed):
    try:
        compiled = grammar.json_schema(schema)
    except grammar.GrammarError:
        return  # refused up front: the router's 400
    text = generate(tok, compiled, random.Random(seed))
    jsonschema.validate(json.loads(text), schema)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(grammar.MAX_SCHEMA_DEPTH + 1, 200), width=st.integers(1, 3))
def test_schemas_beyond_the_bounds_are_refused_before_compiling(depth, width):
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {f"p{i}": schema for i in range(width)}}
    with pytest.raises(grammar.GrammarError, match="nests deeper"):
        grammar.json_schema(schema)


def test_a_schema_too_large_is_refused_with_its_size():
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}}
    with pytest.raises(grammar.GrammarError, match="bytes; at most"):
        grammar.json_schema(schema)
