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
