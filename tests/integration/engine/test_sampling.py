"""Sampling options and stop conditions on the real model."""

from __future__ import annotations

import math

import pytest

from triphase.workers.engine.detokenizer import IncrementalDetokenizer
from triphase.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


@pytest.fixture(scope="module")
def story(loaded_model):
    return loaded_model.tokenizer.encode_chat([{"role": "user", "content": "Tell me a short story about a dragon."}])


def run(engine, prompt, **kw):
    return engine.generate([prompt], SamplingParams(**kw))[0]


def test_seed_is_reproducible_whatever_shares_the_batch(engine, story, chat_prompt_ids):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    alone = engine.generate([story], params)[0].token_ids
    crowded = engine.generate([chat_prompt_ids[0], story, chat_prompt_ids[1]],
                              [SamplingParams(max_tokens=10, temperature=0.9), params,
                               SamplingParams(max_tokens=30, temperature=1.0, seed=3)])[1].token_ids
    other_seed = run(engine, story, max_tokens=24, temperature=1.0, seed=12, ignore_eos=True).token_ids
    assert alone == crowded
    assert alone != other_seed


def test_top_k_one_and_tiny_top_p_are_greedy(engine, story):
    greedy = run(engine, story, max_tokens=16, temperature=0).token_ids
    assert run(engine, story, max_tokens=16, temperature=1.5, top_k=1, seed=1).token_ids == greedy
    assert run(engine, story, max_tokens=16, temperature=1.5, top_p=1e-6, seed=2).token_ids == greedy


def test_max_tokens_and_eos(engine, chat_prompt_ids):
    short = run(engine, chat_prompt_ids[0], max_tokens=3, temperature=0)
    assert len(short.token_ids) == 3 and short.finish_reason == "length"
    full = run(engine, chat_prompt_ids[0], max_tokens=64, temperature=0)
    assert full.finish_reason == "stop" and full.token_ids[-1] in engine.tokenizer.eos_token_ids
    ignored = run(engine, chat_prompt_ids[0], max_tokens=len(full.token_ids) + 5, temperature=0, ignore_eos=True)
    assert ignored.token_ids[: len(full.token_ids)] == full.token_ids
    assert len(ignored.token_ids) == len(full.token_ids) + 5


def test_stop_token_ids_and_stop_strings(engine, story):
    base = run(engine, story, max_tokens=40, temperature=0, ignore_eos=True)
    stop_id = base.token_ids[5]
    by_id = run(engine, story, max_tokens=40, temperature=0, stop_token_ids=(stop_id,))
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
    assert by_id.finish_reason == "stop"
    # A stop string spanning a token boundary: cut the text just before it, never emit it.
    word = base.text[10:16]
    by_text = run(engine, story, max_tokens=40, temperature=0, stop=(word,))
    assert by_text.finish_reason == "stop"
    assert by_text.text == base.text[: base.text.index(word)]


def test_logprobs_are_a_distribution_top_n(engine, story):
    out = run(engine, story, max_tokens=6, temperature=0, logprobs=3)
    assert out.logprobs is not None and len(out.logprobs) == 6
    for token, row in zip(out.token_ids, out.logprobs, strict=True):
        values = list(row.values())
        assert next(iter(row)) == token  # the chosen token comes first
        assert len(row) == 3  # greedy: the chosen token is also the top-1
        assert all(v <= 0 for v in values)
        assert math.isclose(max(values), row[token])
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5


def test_incremental_detokenizer_matches_full_decode(loaded_model):
    tok = loaded_model.tokenizer
    text = "Zürich — naïve café: 東京 🐉 costs 12.50€!\nNext line."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i)[0] for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == text


@pytest.mark.parametrize("stop", [(), ("costs 12",)])
def test_a_stream_handed_over_at_any_token_reads_as_one(loaded_model, stop):
    """A request resumed on another worker: the new detokenizer, primed with the tokens already sent,
    continues the text exactly, even inside a character split across tokens (the emoji here)."""
    tok = loaded_model.tokenizer
    ids = tok.encode("Hola 😊🌍🌍 — 東京 🐉 costs 12.50€!")
    whole = IncrementalDetokenizer(tok, stop)
    expected = "".join(whole.add(i)[0] for i in ids) + whole.flush()
    for k in range(1, len(ids)):
        first, second = IncrementalDetokenizer(tok, stop), IncrementalDetokenizer(tok, stop)
        sent = "".join(first.add(i)[0] for i in ids[:k])
        second.prime(ids[:k])
        assert sent + "".join(second.add(i)[0] for i in ids[k:]) + second.flush() == expected, k


def test_invalid_sampling_parameters_are_rejected():
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"logprobs": 21}, {"stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_a_request_longer_than_the_kv_cache_ends_with_length(make_engine, story):
    engine = make_engine(num_kv_blocks=4)  # 64 tokens of KV
    assert engine.max_model_len == 64
    out = engine.generate([story], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(story) + len(out.token_ids) == 64
    assert engine.kv.num_free_blocks == 4
