"""Pieces of the tiny Hugging Face checkpoints the model tests write (and load with transformers and
with triphase)."""

from __future__ import annotations

import io
import json
import pathlib
from typing import Any

LLAVA_VOCAB = 100
IMAGE_TOKEN = 99  # the tiny LLaVA's image placeholder token id


# w3 opens a turn, w4 closes it, w5 starts the assistant's answer
CHAT_TEMPLATE = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
                 "{% if add_generation_prompt %}w5{% endif %}")


def write_word_tokenizer(folder: pathlib.Path, vocab: int) -> None:
    """A word-level tokenizer over "w0".."w{vocab-1}" (w1 is BOS, w2 EOS; no BOS added) with a chat
    template (CHAT_TEMPLATE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2",
                                                              "add_bos_token": False,
                                                              "chat_template": CHAT_TEMPLATE}))


def build_llava(kind: str, folder: pathlib.Path) -> tuple[Any, Any]:
    """A tiny random LLaVA ("clip": CLIP tower, default strategy, layer -2; "siglip": SigLIP tower, full
    strategy, layers -3 and -1 concatenated) with its image processor and tokenizer; 16 tokens per
    28x28 image. Returns (transformers model, transformers image processor)."""
    import torch
    import transformers

    torch.manual_seed(99 if kind == "clip" else 77)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                  patch_size=7)
    text = transformers.LlamaConfig(vocab_size=LLAVA_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    if kind == "clip":
        config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision), text_config=text,
                                          image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28},
                                                    crop_size={"height": 28, "width": 28})
    else:  # SigLIP: no CLS token, so every position is kept; two feature layers concatenated
        config = transformers.LlavaConfig(vision_config=transformers.SiglipVisionConfig(**vision), text_config=text,
                                          image_token_id=IMAGE_TOKEN, vision_feature_select_strategy="full",
                                          vision_feature_layer=[-3, -1], projector_hidden_act="gelu")
        processor = transformers.SiglipImageProcessor(size={"height": 28, "width": 28})
    model = transformers.LlavaForConditionalGeneration(config).eval()
    for param in model.parameters():  # the default init is too small to tell mistakes apart
        param.data.normal_(0, 0.15)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    write_word_tokenizer(folder, LLAVA_VOCAB)
    return model, processor


def png(seed: int, width: int, height: int, mode: str = "RGB") -> bytes:
    """Random pixels as a PNG."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels if len(mode) > 1 else pixels[..., 0], mode).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------- one small checkpoint per model family
FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma3", "phi3"]
TINY_VOCAB = 96
TINY_WINDOW = 12  # shorter than the tests' longer prompts, so sliding layers really drop keys


def family_config(kind: str, *, vocab: int = TINY_VOCAB, hidden: int = 64, intermediate: int = 96, layers: int = 3,
                  heads: int = 4, kv_heads: int = 2, head_dim: int | None = None, experts: int | None = None,
                  top_k: int | None = None, moe_intermediate: int = 32, window: int = TINY_WINDOW,
                  dense_layers: tuple[int, ...] = (1,)) -> Any:
    """A transformers config of family `kind`, tiny by default, exercising what sets the family apart:
    Llama 3 rope scaling (untied), Qwen2 qkv bias (tied), Qwen3 q/k norms with a head_dim of its own,
    Qwen3-MoE top-k without renormalisation and a dense layer among sparse ones, Mixtral top-2 with a
    sliding window on every layer, Gemma 3 (interleaved sliding and global layers with their own rotary
    bases, linear scaling on the global ones, soft-capped logits), Phi-3 (fused matrices, sliding)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
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
        return transformers.Qwen3Config(**common, head_dim=head_dim or 24, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=head_dim or 16, num_experts=experts or 8,
                                           num_experts_per_tok=top_k or 3, moe_intermediate_size=moe_intermediate,
                                           mlp_only_layers=list(dense_layers), norm_topk_prob=False)
    if kind == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=experts or 4, num_experts_per_tok=top_k or 2,
                                          sliding_window=window)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, head_dim=head_dim or 16, query_pre_attn_scalar=24, sliding_window=window,
            layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
            final_logit_softcapping=3.0,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        )
    assert kind == "phi3", kind
    return transformers.Phi3Config(**common, sliding_window=window)


def build_checkpoint(kind: str, folder: pathlib.Path, **sizes: Any) -> Any:
    """Write a random checkpoint of `family_config(kind, **sizes)` with a word tokenizer to `folder`
    (safetensors); returns the transformers model (float32, eval mode, EOS off: always max tokens)."""
    import torch
    import transformers

    torch.manual_seed(FAMILIES.index(kind) + 1234)
    model = transformers.AutoModelForCausalLM.from_config(family_config(kind, **sizes)).eval()
    for name, param in model.named_parameters():  # the default init is too small to tell mistakes apart
        if "norm" in name:
            param.data.normal_(0 if kind == "gemma3" else 1, 0.2)
        elif "bias" in name:
            param.data.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, sizes.get("vocab", TINY_VOCAB))
    return model
