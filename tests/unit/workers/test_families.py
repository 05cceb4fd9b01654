"""config.json -> ModelConfig for each family: which layers slide, which are sparse, and every setting
the engine does not implement refused at load with the field named (never silently ignored)."""

from __future__ import annotations

import json

import pytest

from triphase.common.errors import UserError
from triphase.workers.models.config import FULL, SLIDING
from triphase.workers.models.families import hf_config
from triphase.workers.models.loader import load_model

S, F = SLIDING, FULL
BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2)


def config(model_type, **extra):
    return hf_config({**BASE, "model_type": model_type, **extra}, model_type, "tiny", ())


@pytest.mark.parametrize("model_type, extra, expected", [
    ("llama", {}, ()),
    ("mistral", {"sliding_window": 8}, (S,) * 6),
    ("mistral", {"sliding_window": None}, ()),
    ("phi3", {"sliding_window": 8}, (S,) * 6),
    # Qwen: only with use_sliding_window, and only from max_window_layers on
    ("qwen2", {"sliding_window": 8, "use_sliding_window": False}, ()),
    ("qwen3", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 4}, (F,) * 4 + (S,) * 2),
    # Gemma 3's configs before transformers 5: every sliding_window_pattern-th layer is global
    ("gemma3_text", {"sliding_window": 8, "sliding_window_pattern": 3}, (S, S, F, S, S, F)),
    ("gemma3_text", {"sliding_window": 8, "layer_types": [F, S, F, S, F, S]}, (F, S, F, S, F, S)),
])
def test_which_layers_slide(model_type, extra, expected):
    cfg = config(model_type, **extra)
    assert cfg.layer_types == expected
    assert [cfg.window(i) for i in range(6)] == [8 if t == S else None for t in expected or (F,) * 6]


def test_sparse_layers_follow_the_step_and_the_dense_list():
    cfg = config("qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                 decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True)
    assert cfg.moe is not None and cfg.moe.layers == (1, 5) and cfg.moe.normalize_top_k
    mixtral = config("mixtral", num_local_experts=8, num_experts_per_tok=2).moe
    assert mixtral is not None and mixtral.layers == tuple(range(6)) and mixtral.normalize_top_k
    assert mixtral.intermediate_size == 96


def test_gemma3_settings_from_old_and_new_configs():
    old = config("gemma3_text", sliding_window=8, rope_theta=1e6, rope_local_base_freq=1e4,
                 rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=16)
    new = config("gemma3_text", sliding_window=8, query_pre_attn_scalar=16, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    for cfg in (old, new):
        assert (cfg.rope_theta, cfg.local_rope_theta) == (1e6, 1e4)
        assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
        assert cfg.attention_scale == 16 ** -0.5 and cfg.embedding_scale == 8.0
        assert cfg.norm_plus_one and cfg.sandwich_norm and cfg.qk_norm and cfg.tie_word_embeddings
        assert cfg.head_dim == 256 and cfg.hidden_act == "gelu_pytorch_tanh"


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "gpt_neox"}, "unsupported architecture 'gpt_neox'"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}},
     "unsupported rope_scaling type 'longrope'"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}},
     "partial_rotary_factor"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"model_type": "llama", "hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"model_type": "qwen3", "layer_types": [S] * 6}, "sliding_window is not set"),
    ({"model_type": "qwen3", "layer_types": [F] * 5}, "layer_types must be 6"),
    ({"model_type": "mixtral"}, "num_local_experts"),
    ({"model_type": "gemma3"}, "needs a text_config"),
])
def test_unsupported_settings_are_refused_at_load(raw, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **raw}))
    with pytest.raises(UserError, match=str(tmp_path)) as info:
        load_model(str(tmp_path))
    assert message in str(info.value)
    if raw["model_type"] == "gpt_neox":  # the refusal lists what is supported
        assert "qwen3_moe" in str(info.value) and "gemma3_text" in str(info.value)
