"""The engine against Hugging Face transformers loading the same GGUF: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from triphase.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

TEXT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In 1492, Columbus sailed the ocean blue. The year after that,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Paris, London, Berlin, Madrid and",
    "The mitochondria is the powerhouse of the cell. It produces",
    "Once upon a time, in a kingdom far away, there lived",
    "SELECT name, age FROM users WHERE",
    "1, 1, 2, 3, 5, 8, 13, 21,",
    "Water boils at 100 degrees Celsius at sea level, but on a mountain",
    "The best way to learn a new language is",
    "Q: What color is a banana?\nA:",
]


def test_teacher_forced_logits_match_transformers(make_engine, hf_model, loaded_model):
    engine = make_engine()
    tok = loaded_model.tokenizer
    worst = 0.0
    for i, text in enumerate(TEXT_PROMPTS):
        ids = tok.encode(text)
        # Alternate whole-prompt and chunked prefill so both attention paths are compared.
        ours = engine.prompt_logits(ids, chunk_size=None if i % 2 == 0 else 5)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        worst = max(worst, float((ours - ref).abs().max()))
    assert worst < 1e-3, f"max abs logit difference {worst:.2e}"
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_greedy_chat_completions_match_transformers_generate(make_engine, hf_model, chat_prompt_ids):
    engine = make_engine()
    ours = engine.generate(chat_prompt_ids, SamplingParams(max_tokens=48, temperature=0))
    for prompt, completion in zip(chat_prompt_ids, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected = out[0, len(prompt):].tolist()
        assert completion.token_ids == expected, completion.text
