"""Sampling options and stop conditions on the real model: penalties, logit bias, min_tokens, min_p and
grammars each against a reference computed from the engine's own teacher-forced logits (transformers'
processors where they exist)."""

from __future__ import annotations

import dataclasses
import json
import math

import jsonschema
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from triphase.common import grammar
from triphase.common.sampling import choice_seed
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


def greedy_reference(engine, prompt, steps, process):
    """Greedy decoding where `process(logits, prompt, output)` adjusts each step's raw logits."""
    output: list[int] = []
    for _ in range(steps):
        logits = engine.prompt_logits(prompt + output)[-1].clone()
        process(logits, prompt, output)
        output.append(int(logits.argmax()))
    return output


def greedy(engine, prompt, **kw):
    return engine.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, **kw))[0]


def test_repetition_penalty_matches_transformers(engine, story):
    processor = RepetitionPenaltyLogitsProcessor(1.3)

    def process(logits, prompt, output):
        logits[:] = processor(torch.tensor([prompt + output]), logits[None])[0]

    got = greedy(engine, story, max_tokens=12, repetition_penalty=1.3).token_ids
    assert got == greedy_reference(engine, story, 12, process)
    assert got != greedy(engine, story, max_tokens=12).token_ids  # the penalty changed something


def test_frequency_and_presence_penalties_count_the_output(engine, story):
    def process(logits, prompt, output):
        for token in set(output):
            logits[token] -= 1.5 * output.count(token) + 0.5

    got = greedy(engine, story, max_tokens=16, frequency_penalty=1.5, presence_penalty=0.5).token_ids
    assert got == greedy_reference(engine, story, 16, process)
    assert got != greedy(engine, story, max_tokens=16).token_ids


def test_logit_bias_and_min_tokens(engine, story, loaded_model):
    plain = greedy(engine, story, max_tokens=6).token_ids
    banned = plain[0]
    biased = greedy(engine, story, max_tokens=6, logit_bias=((banned, -100.0),)).token_ids
    assert banned not in biased
    forced = greedy(engine, story, max_tokens=3, logit_bias=((42, 100.0),)).token_ids
    assert forced == [42, 42, 42]
    eos = loaded_model.tokenizer.eos_token_ids[0]
    # EOS made the likeliest token: without min_tokens the request ends at once, with it not before 5
    params = dict(max_tokens=8, logit_bias=((eos, 100.0),))
    assert engine.generate([story], SamplingParams(temperature=0, **params))[0].token_ids == [eos]
    held = engine.generate([story], SamplingParams(temperature=0, min_tokens=5, **params))[0]
    assert len(held.token_ids) == 6 and held.token_ids[-1] == eos and eos not in held.token_ids[:5]


def test_min_p_one_is_greedy(engine, story):
    expected = greedy(engine, story, max_tokens=10).token_ids
    sampled = engine.generate([story], SamplingParams(max_tokens=10, temperature=1.5, min_p=1.0, seed=5,
                                                      ignore_eos=True))[0].token_ids
    assert sampled == expected


def test_logprobs_are_raw_whatever_the_processing(engine, story):
    plain = greedy(engine, story, max_tokens=1, logprobs=3)
    biased = greedy(engine, story, max_tokens=1, logprobs=3, presence_penalty=2.0)
    assert plain.logprobs == biased.logprobs


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pets": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(engine, loaded_model, temperature):
    prompt = loaded_model.tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    params = SamplingParams(max_tokens=80, temperature=temperature, seed=3, grammar=grammar.json_schema(SCHEMA))
    out = engine.generate([prompt], params)[0]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_a_compiled_grammar_is_reused(engine, loaded_model):
    prompt = loaded_model.tokenizer.encode("The answer is")
    g = grammar.regex("(yes|no)")
    before = engine.grammars.compiled
    outs = engine.generate([prompt, prompt], SamplingParams(max_tokens=5, temperature=0, grammar=g))
    assert {o.text for o in outs} <= {"yes", "no"} and all(o.finish_reason == "stop" for o in outs)
    assert engine.grammars.compiled - before <= 1


def run_choices(engine, request_id, prompt, params):
    """Step a request to its end: each choice's tokens, and the most KV blocks in use at once."""
    engine.add_request(request_id, prompt, params)
    choices: dict[int, list[int]] = {}
    peak, done = 0, False
    while not done:
        for out in engine.step():
            assert out.request_id == request_id
            choices.setdefault(out.index, []).extend(out.new_token_ids)
            done = out.done
        peak = max(peak, engine.kv.pool.num_blocks - engine.kv.num_free_blocks)
    return choices, peak


def test_n_choices_share_the_prompt_and_sample_as_their_own_seeds(engine, story):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=9, ignore_eos=True, n=4)
    choices, peak = run_choices(engine, "four", story, params)
    assert sorted(choices) == [0, 1, 2, 3]
    alone = [engine.generate([story], dataclasses.replace(params, n=1, seed=choice_seed(9, i)))[0].token_ids
             for i in range(4)]
    assert [choices[i] for i in range(4)] == alone
    assert len({tuple(c) for c in choices.values()}) > 1
    _, one = run_choices(engine, "one", story, dataclasses.replace(params, n=1))
    assert peak < 4 * one - len(story) // engine.layout.block_size  # the prompt's full blocks held once
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks  # every block back


def test_n_choices_greedy_are_identical_and_aborting_frees_every_choice(engine, story):
    choices, _ = run_choices(engine, "greedy", story, SamplingParams(max_tokens=6, temperature=0, n=3,
                                                                     ignore_eos=True))
    assert choices[0] == choices[1] == choices[2]
    engine.add_request("gone", story, SamplingParams(max_tokens=50, temperature=1.0, n=3))
    while not any(out.index == 2 for out in engine.step()):
        pass
    assert engine.abort("gone")
    assert not engine.has_work and engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_prompt_logprobs_equal_the_teacher_forced_logits(make_engine, story):
    engine = make_engine(max_num_batched_tokens=16)  # the prompt in several chunks
    out = engine.generate([story], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    expected = torch.log_softmax(engine.prompt_logits(story), dim=-1)
    assert len(out.prompt_logprobs) == len(story) and out.prompt_logprobs[0] == {}
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        token = story[position]
        assert next(iter(entry)) == token
        assert abs(entry[token] - float(expected[position - 1, token])) < 1e-4
        top = torch.topk(expected[position - 1], 2).indices.tolist()
        assert set(top) <= set(entry)
    # a second request with the same prompt is computed again, not served from the prefix cache
    again = engine.generate([story], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert again.num_cached_tokens == 0
    assert [next(iter(e.values())) for e in again.prompt_logprobs[1:]] == \
        pytest.approx([next(iter(e.values())) for e in out.prompt_logprobs[1:]], abs=1e-5)
