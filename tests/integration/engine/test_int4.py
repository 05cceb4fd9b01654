"""4-bit GGUF weights kept packed: exact unpacking, kernel agreement, and the int4 engine mode."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.models.loader import load_model
from triphase.workers.models.quant import Int4Linear, parse_gguf_q4

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_unpacking_matches_gguf_dequantize_exactly(kind):
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(48, 128)).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(dense, qtype)
    blocks = parse_gguf_q4(raw, kind, 48, 128)
    np.testing.assert_array_equal(blocks.dequantize(), gguf.quants.dequantize(raw, qtype).reshape(48, 128))


def test_int4_kernel_agrees_with_dense_matmul():
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(96, 256)).astype(np.float32)
    blocks = parse_gguf_q4(gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q4_1), "Q4_1", 96, 256)
    x = torch.randn(5, 256)
    reference = x @ torch.from_numpy(blocks.dequantize()).t()
    got = Int4Linear(blocks)(x.bfloat16()).float()
    assert float((got - reference).abs().max() / reference.abs().max()) < 2e-2


@pytest.fixture(scope="module")
def int4_engine():
    loaded = load_model(None, dtype=torch.bfloat16, keep_quantized=True)
    assert len(loaded.quantized) == 7 * loaded.config.num_hidden_layers
    return Engine(loaded, EngineConfig(dtype="bfloat16", weights="int4", num_kv_blocks=128, int4_max_tokens=8))


def test_int4_mode_tracks_the_float32_reference(int4_engine, make_engine, chat_prompt_ids):
    reference = make_engine()
    agree = total = 0
    for prompt in chat_prompt_ids[:4]:
        ref = reference.prompt_logits(prompt).argmax(-1)
        # chunks of 4 tokens go through the int4 kernels (<= int4_max_tokens rows per step)
        got = int4_engine.prompt_logits(prompt, chunk_size=4).argmax(-1)
        agree += int((ref == got).sum())
        total += len(prompt)
    assert agree / total > 0.9


def test_int4_mode_needs_bfloat16_and_a_quantized_file(loaded_model):
    from triphase.common.errors import UserError

    with pytest.raises(UserError, match="bfloat16"):
        EngineConfig(weights="int4")
    with pytest.raises(UserError, match="Q4_0/Q4_1"):
        Engine(loaded_model, EngineConfig(dtype="bfloat16", weights="int4", num_kv_blocks=8))
