"""LLaVA-style models (CLIP or SigLIP tower + MLP projector + Llama) against transformers' LLaVA:
tiny random-weight checkpoints written by the test, loaded by both; 0, 1 and 3 images per prompt."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import IMAGE_TOKEN, build_llava, png
from triphase.common.block_hash import ImageSpan
from triphase.common.images import ImageLimits, decode, digest
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.multimodal import ImageInput
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.models.loader import load_model

pytestmark = pytest.mark.slow
LIMITS = ImageLimits()


def prompt_with_images(engine, text_ids, images, where):
    """Insert each image's placeholder run before text position where[i]; returns (tokens, inputs)."""
    n = engine.vision_config.tokens_per_image
    embeds = engine.encode_images([decode(data, LIMITS) for data in images])
    tokens, inputs, cursor = [], [], 0
    for data, rows, at in zip(images, embeds, where, strict=True):
        tokens += text_ids[cursor:at]
        inputs.append(ImageInput(ImageSpan(len(tokens), n, digest(data)), rows))
        tokens += [IMAGE_TOKEN] * n
        cursor = at
    return tokens + text_ids[cursor:], inputs


@pytest.fixture(scope="module", params=["clip", "siglip"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model, processor = build_llava(request.param, folder)
    return request.param, folder, model, processor


def test_preprocessing_matches_transformers(checkpoint):
    _, folder, _, processor = checkpoint
    loaded = load_model(str(folder))
    images = [decode(png(1, 57, 40), LIMITS), decode(png(2, 30, 90), LIMITS), decode(png(3, 28, 28), LIMITS)]
    ours = loaded.image_processor(images)
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < 1e-5


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_logits_and_greedy_tokens_match_transformers(checkpoint, num_images):
    kind, folder, reference, processor = checkpoint
    engine = Engine(load_model(str(folder)), EngineConfig(num_kv_blocks=128, block_size=8,
                                                          max_num_batched_tokens=12))  # image runs span chunks
    assert engine.vision_config.tokens_per_image == 16
    images = [png(10 + i, 40 + 9 * i, 33 + 5 * i) for i in range(num_images)]
    text = torch.randint(3, IMAGE_TOKEN, (13,), generator=torch.Generator().manual_seed(num_images)).tolist()
    tokens, inputs = prompt_with_images(engine, text, images, where=[1, 5, 12][:num_images])

    pixels = {"pixel_values": processor(images=[decode(d, LIMITS) for d in images],
                                        return_tensors="pt")["pixel_values"]} if images else {}
    with torch.no_grad():
        ref_logits = reference(torch.tensor([tokens]), **pixels).logits[0]
        out = reference.generate(torch.tensor([tokens]), **pixels, max_new_tokens=16, do_sample=False,
                                 attention_mask=torch.ones(1, len(tokens), dtype=torch.long))
    ours_logits = engine.prompt_logits(tokens, images=inputs)
    assert float((ours_logits - ref_logits).abs().max()) < 1e-3, kind
    completion = engine.generate([tokens], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
                                 images=[inputs])[0]
    assert completion.token_ids == out[0, len(tokens):].tolist()


def test_prefix_cache_tells_images_apart(checkpoint):
    _, folder, _, _ = checkpoint
    engine = Engine(load_model(str(folder)), EngineConfig(num_kv_blocks=128, block_size=8))
    fresh = Engine(load_model(str(folder)), EngineConfig(num_kv_blocks=128, block_size=8,
                                                         enable_prefix_caching=False))
    text = list(range(3, 30))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a, inputs_a = prompt_with_images(engine, text, [png(20, 50, 50)], where=[4])
    b, inputs_b = prompt_with_images(engine, text, [png(21, 50, 50)], where=[4])
    assert a == b  # the same tokens: only the images differ
    first = engine.generate([a], params, images=[inputs_a])[0]
    assert first.num_cached_tokens == 0
    again = engine.generate([a], params, images=[inputs_a])[0]
    assert again.num_cached_tokens >= 32 and again.token_ids == first.token_ids  # a repeated image hits
    other = engine.generate([b], params, images=[inputs_b])[0]
    assert other.num_cached_tokens == 0  # only the text before the image is shared, and it is not a full block
    assert other.token_ids == fresh.generate([b], params, images=[inputs_b])[0].token_ids


def test_bad_image_inputs_are_refused(checkpoint):
    _, folder, _, _ = checkpoint
    engine = Engine(load_model(str(folder)), EngineConfig(num_kv_blocks=64, block_size=8))
    tokens, inputs = prompt_with_images(engine, list(range(3, 20)), [png(30, 40, 40)], where=[2])
    params = SamplingParams(max_tokens=2)
    span = inputs[0].span
    cases = {
        "outside": [ImageInput(ImageSpan(len(tokens) - 4, 16, span.digest), inputs[0].embeds)],
        "not image tokens": [ImageInput(ImageSpan(0, 16, span.digest), inputs[0].embeds)],
        "shape": [ImageInput(span, inputs[0].embeds[:-1])],
        "no embeddings": [ImageInput(span, None)],
        "overlapping": [inputs[0], inputs[0]],
    }
    for name, images in cases.items():
        with pytest.raises(ValueError):
            engine.add_request(f"bad-{name}", tokens, params, images=images)
    assert not engine.has_work
