"""GGUF files of the newer families, written the way llama.cpp's converter names things (gguf-py's own
tensor-name map and metadata keys, experts stacked per layer) from tiny random Hugging Face checkpoints:
loaded by triphase, they give transformers' logits (within 1e-4) and greedy tokens on the original."""

from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoints import TINY_VOCAB, build_checkpoint
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.models.loader import load_model

pytestmark = pytest.mark.slow


def write_gguf(kind, folder, path):
    import gguf
    from safetensors.torch import load_file

    arch = {"qwen3": gguf.MODEL_ARCH.QWEN3, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}[kind]
    cfg = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    tensors = load_file(folder / "model.safetensors")
    if kind == "qwen3_moe":
        experts = cfg.get("num_experts") or cfg["num_local_experts"]
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        for layer in range(cfg["num_hidden_layers"]):  # llama.cpp stacks each matrix's experts in one tensor
            for part in ("gate_proj", "up_proj", "down_proj"):
                stem = f"model.layers.{layer}.mlp.experts"
                names = [f"{stem}.{e}.{part}.weight" for e in range(experts)]
                if names[0] in tensors:
                    tensors[f"{stem}.{part}.weight"] = torch.stack([tensors.pop(n) for n in names])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([f"w{i}" for i in range(TINY_VOCAB)])
    writer.add_token_types([1] * TINY_VOCAB)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    for name, tensor in tensors.items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_gguf_of_a_newer_family_matches_transformers(kind, tmp_path):
    folder = tmp_path / "hf"
    # llama.cpp's qwen3moe has no dense layers among the sparse ones
    reference = build_checkpoint(kind, folder, **({"dense_layers": ()} if kind == "qwen3_moe" else {}))
    if kind == "qwen3_moe":  # llama.cpp's qwen3moe always renormalises the chosen experts' weights
        reference.config.norm_topk_prob = True
        for layer in reference.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "norm_topk_prob"):
                layer.mlp.gate.norm_topk_prob = True
    path = tmp_path / f"{kind}.gguf"
    write_gguf(kind, folder, path)
    loaded = load_model(str(path))
    assert loaded.config.architecture == kind and loaded.config.qk_norm
    assert (loaded.config.moe is not None) == (kind == "qwen3_moe")
    engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16))
    prompt = torch.randint(3, TINY_VOCAB, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    [ours] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    with torch.no_grad():
        ref_logits = reference(torch.tensor([prompt])).logits[0]
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert ours.token_ids == out[0, len(prompt):].tolist()
    assert float((engine.prompt_logits(prompt) - ref_logits).abs().max()) < 1e-4
