"""The offline vision demo: MobileNetV2 converted from the nsfwjs npm package computes what
TensorFlow.js computes with the same files; the demo model encodes images into SmolLM2-sized
embeddings and different images change what the language model sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tfjs
from tests.checkpoints import png
from triphase.common.block_hash import ImageSpan
from triphase.common.images import ImageLimits, decode, digest
from triphase.local import demo_vision
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.multimodal import ImageInput

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    return Engine.from_path(str(demo_vision.ensure(progress=False)), EngineConfig(dtype="float32",
                                                                                  num_kv_blocks=64))


def images():
    gradient = np.linspace(0, 255, 320 * 240 * 3).reshape(240, 320, 3).astype(np.uint8)
    return [decode(png(1, 300, 200), ImageLimits()), decode(png(2, 64, 64), ImageLimits()),
            Image.fromarray(gradient)]


def test_backbone_matches_tensorflow_js(engine):
    pixels = engine.image_processor(images())
    ours = engine.vision.backbone(pixels).numpy()
    model_js, shard_js = demo_vision.model_files(demo_vision.download(progress=False))
    theirs = tfjs.mobilenet_features(model_js, shard_js, pixels.permute(0, 2, 3, 1).numpy()).reshape(ours.shape)
    assert float(np.abs(theirs).max()) > 1  # not all zeros: the layer computes something
    assert float(np.abs(ours - theirs).max()) < 2e-3


def test_images_become_embeddings_the_language_model_can_take(engine):
    rows = engine.encode_images(images())
    assert [tuple(r.shape) for r in rows] == [(49, 576)] * 3
    embed_std = float(engine.model.embed.float().std())
    for r in rows:
        assert 0.3 * embed_std < float(r.std()) < 3 * embed_std  # the spread of SmolLM2's token embeddings
    text = engine.tokenizer.encode("Describe the image:")
    logits = []
    for data, r in zip((b"one", b"two"), rows[:2], strict=True):
        tokens = [engine.image_token_id] * 49 + text
        logits.append(engine.prompt_logits(tokens, images=[ImageInput(ImageSpan(0, 49, digest(data)), r)])[-1])
    assert float((logits[0] - logits[1]).abs().max()) > 0.1  # another image, another next-token distribution
    assert torch.isfinite(logits[0]).all()
