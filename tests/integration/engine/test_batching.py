"""Continuous batching changes nothing a request sees: mixed lengths, chunked prefill, prefix-cache
hits and preemption give the same tokens as running each request alone; prefill on one engine +
KV export/import + decode on another equals one engine."""

from __future__ import annotations

import pytest

from triphase.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(loaded_model, chat_prompt_ids):
    tok = loaded_model.tokenizer
    shared = "You are a terse assistant. Answer in as few words as you can, and never apologise."
    with_system = [
        tok.encode_chat([{"role": "system", "content": shared}, {"role": "user", "content": q}])
        for q in ("Name a red fruit.", "Name a blue fish.", "Name a green vegetable.")
    ]
    long_doc = tok.encode("Here is a long list of words: " + ", ".join(f"item{i}" for i in range(90)) + ". Repeat it.")
    return [*chat_prompt_ids[:5], *with_system, long_doc, tok.encode("Hi")]


@pytest.fixture(scope="module")
def alone(make_engine, prompts):
    engine = make_engine(enable_prefix_caching=False)
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_mixed_batch_with_chunking_prefix_hits_and_preemption_matches_alone(make_engine, prompts, alone):
    # A tiny budget forces chunked prefill; 40 blocks of 16 tokens cannot hold all 10 requests
    # at full length, so some are preempted and recomputed.
    engine = make_engine(num_kv_blocks=40, max_num_batched_tokens=48)
    together = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in together] == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.prefix_hits > 0
    assert sum(c.num_cached_tokens for c in together[6:8]) > 0  # the shared system prompt was reused
    assert engine.kv.num_free_blocks == 40


def test_prefix_cache_hit_gives_same_tokens(make_engine, prompts, alone):
    engine = make_engine()
    engine.generate([prompts[5]], GREEDY)
    again = engine.generate([prompts[5]], GREEDY)[0]
    assert again.num_cached_tokens >= 16
    assert again.token_ids == alone[5]


@pytest.mark.parametrize("with_data", [True, False])
def test_prefill_export_import_decode_equals_one_engine(make_engine, prompts, alone, with_data):
    a, b = make_engine(), make_engine(num_kv_blocks=97)  # different capacity: block ids differ
    b.generate([prompts[1]], GREEDY)  # occupy b's cache so imported blocks land elsewhere
    for i in (0, 8, 9):
        export = a.prefill(f"r{i}", prompts[i], GREEDY)
        assert export.num_tokens == len(prompts[i])
        if with_data:
            export = a.export_kv(f"r{i}", with_data=True)
        request, first = b.import_kv(f"r{i}", prompts[i], GREEDY, export, source=None if with_data else a)
        assert first.new_token_ids == [alone[i][0]]
        assert a.release_kv(f"r{i}")
        while not request.status.finished:
            b.step()
        assert request.output_token_ids == alone[i]
    assert a.kv.num_free_blocks == a.kv.pool.num_blocks
    assert b.kv.num_free_blocks == b.kv.pool.num_blocks


def test_abort_frees_blocks_at_once(make_engine, prompts):
    engine = make_engine()
    engine.add_request("x", prompts[8], GREEDY)
    engine.add_request("y", prompts[0], GREEDY)
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.pool.num_blocks
    assert engine.abort("x") and engine.abort("y")
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert not engine.has_work
    pinned = engine.prefill("p", prompts[0], GREEDY)
    assert pinned.block_ids and engine.abort("p")
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
