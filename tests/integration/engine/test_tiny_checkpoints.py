"""Tiny random-weight checkpoints of every supported family (tests/checkpoints.py `family_config` says
what each exercises), written to safetensors by the test and loaded by both transformers (the oracle,
float32) and triphase: logits within 1e-4 and identical greedy tokens, prompts chunked across steps and
decoded in a batch."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import FAMILIES, TINY_VOCAB, build_checkpoint
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.models.loader import load_model

pytestmark = pytest.mark.slow
VOCAB = TINY_VOCAB


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
