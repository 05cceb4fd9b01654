"""Tiny random-weight Llama (Llama 3 rope scaling, untied) and Qwen2 (qkv bias, tied) checkpoints,
written to safetensors by the test and loaded by both transformers and triphase."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import write_word_tokenizer
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.models.loader import load_model

pytestmark = pytest.mark.slow
VOCAB = 96


def build_checkpoint(kind, folder):
    import transformers

    torch.manual_seed(1234 if kind == "llama" else 4321)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.4, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        config = transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            rope_theta=50000.0,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = transformers.Qwen2ForCausalLM(config)
    model.eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: always 24 tokens
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, VOCAB)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_checkpoint_tokens_match(kind, tmp_path):
    reference = build_checkpoint(kind, tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.config.architecture == kind
    assert loaded.config.tie_word_embeddings == (kind == "qwen2")
    assert (loaded.config.rope_scaling is not None) == (kind == "llama")
    engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40, 61)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ours = engine.generate(prompts, params)
    for prompt, completion in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref_logits = reference(torch.tensor([prompt])).logits[0]
            mask = torch.ones(1, len(prompt), dtype=torch.long)
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, attention_mask=mask)
        assert completion.token_ids == out[0, len(prompt):].tolist()
        ours_logits = engine.prompt_logits(prompt)
        assert float((ours_logits - ref_logits).abs().max()) < 1e-4
