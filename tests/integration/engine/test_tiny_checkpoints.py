"""Tiny random-weight checkpoints of every supported family, written to safetensors by the test and
loaded by both transformers (the oracle, float32) and triphase: logits within 1e-4 and identical greedy
tokens, prompts chunked across steps and decoded in a batch.

What each one covers: Llama (Llama 3 rope scaling, untied), Qwen2 (qkv bias, tied), Qwen3 (q/k norms),
Qwen3-MoE (top-k routing without renormalisation, a dense layer among sparse ones), Mixtral (top-2,
renormalised, sliding window on every layer), Gemma 3 (1 + w norms, sandwich norms, scaled
embeddings, tanh-GELU, interleaved sliding and global layers with their own rotary bases, linear
scaling on the global ones, soft-capped logits), Phi-3 (fused q|k|v and gate|up, sliding window)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import write_word_tokenizer
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.models.loader import load_model

pytestmark = pytest.mark.slow
VOCAB = 96
FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma3", "phi3"]
# A window shorter than the longer prompts, so the sliding layers really drop keys.
WINDOW = 12


def transformers_config(kind):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        return transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            rope_theta=50000.0,
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, rms_norm_eps=1e-6)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=16, num_experts=8, num_experts_per_tok=3,
                                           moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=False)
    if kind == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=WINDOW)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=3.0,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        )
    assert kind == "phi3"
    return transformers.Phi3Config(**common, sliding_window=WINDOW)


def build_checkpoint(kind, folder):
    import transformers

    torch.manual_seed(FAMILIES.index(kind) + 1234)
    config = transformers_config(kind)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for name, param in model.named_parameters():  # the default init is too small to tell mistakes apart
        if "norm" in name:
            param.data.normal_(0 if kind == "gemma3" else 1, 0.2)
        elif "bias" in name:
            param.data.normal_(0, 0.2)
    model.generation_config.eos_token_id = None  # like ignore_eos: always 24 tokens
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, VOCAB)
    return model


@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_checkpoint_tokens_match(kind, tmp_path):
    reference = build_checkpoint(kind, tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.config.architecture == kind
    assert loaded.config.tie_word_embeddings == (kind in ("qwen2", "gemma3"))
    assert (loaded.config.rope_scaling is not None) == (kind in ("llama", "gemma3"))
    assert (loaded.config.moe is not None) == (kind in ("qwen3_moe", "mixtral"))
    assert (loaded.config.sliding_window is not None) == (kind in ("mixtral", "gemma3", "phi3"))
    engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40, 61)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ours = engine.generate(prompts, params)
    moe = loaded.config.moe
    if moe is not None:  # every computed token went through each sparse layer's top-k experts
        computed = sum(len(p) + params.max_tokens - 1 for p in prompts)
        load = engine.model.expert_load
        assert load.routed_tokens == computed * moe.top_k * len(moe.layers)
        most = min(load.routed_tokens, engine.num_steps * moe.num_experts * len(moe.layers))
        assert len(moe.layers) <= load.active_experts <= most
    for prompt, completion in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref_logits = reference(torch.tensor([prompt])).logits[0]
            mask = torch.ones(1, len(prompt), dtype=torch.long)
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, attention_mask=mask)
        assert completion.token_ids == out[0, len(prompt):].tolist()
        ours_logits = engine.prompt_logits(prompt)
        assert float((ours_logits - ref_logits).abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_one_expert_perturbed_by_one_percent_is_caught(kind, tmp_path):
    """The comparison above has teeth for the expert layers: scaling one expert's down projection by
    1.01 moves the logits far past its 1e-4 tolerance."""
    reference = build_checkpoint(kind, tmp_path)
    loaded = load_model(str(tmp_path))
    loaded.weights["model.layers.0.mlp.experts.1.down_proj.weight"].mul_(1.01)
    engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16))
    prompt = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.no_grad():
        ref_logits = reference(torch.tensor([prompt])).logits[0]
    assert float((engine.prompt_logits(prompt) - ref_logits).abs().max()) > 1e-3


def test_a_checkpoint_missing_one_expert_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from triphase.common.errors import UserError

    build_checkpoint("mixtral", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.3\.down_proj\.weight"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("with_data", [True, False])
def test_sliding_window_hand_off_moves_and_keeps_only_the_window(with_data, tmp_path):
    """Mixtral's tiny checkpoint slides on every layer (window 12, blocks of 4): the prefill engine
    drops the blocks out of the window as it goes, the decode engine is given and fills only the live
    tail, and keeps at most ceil(12 / 4) + 1 blocks while decoding; tokens equal transformers."""
    reference = build_checkpoint("mixtral", tmp_path)
    loaded = load_model(str(tmp_path))
    config = EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    a, b = Engine(loaded, config), Engine(loaded, config)
    prompt = torch.randint(3, VOCAB, (41,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    export = a.prefill("r", prompt, params)
    null = a.kv.null_block.block_id
    assert export.block_ids[:7] == [null] * 7 and null not in export.block_ids[7:]  # next query 41 reads 30..41
    if with_data:
        export = a.export_kv("r", with_data=True)
    free_before = b.kv.num_free_blocks
    request, first = b.import_kv("r", prompt, params, export, source=None if with_data else a)
    assert free_before - b.kv.num_free_blocks == 4  # blocks 7..10 of 11
    assert a.release_kv("r")
    live = []
    while not request.status.finished:
        b.step()
        live.append(sum(1 for i in b.kv.block_ids("r") if i != b.kv.null_block.block_id))
    assert [first.new_token_ids[0], *request.output_token_ids[1:]] == out[0, len(prompt):].tolist()
    assert max(live) <= 4 and b.kv.blocks_dropped > 0
    assert b.kv.num_free_blocks == b.kv.pool.num_blocks - 1 == a.kv.num_free_blocks
