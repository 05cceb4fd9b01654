"""What each model family's Hugging Face `config.json` and tensor names mean to `ModelConfig`.

One function per concern, each a table over the families, so adding one is a few lines in each:
`hf_config` (config.json -> ModelConfig; every setting we cannot honour is refused, never ignored),
`hf_tensor_name` (checkpoint names -> the Llama-style names model code reads), `split_fused` (Phi-3's
fused q|k|v and gate|up matrices into their parts, fused again by the model in its own layout) and
`layer_tensors` (what a complete layer holds, so a truncated file fails at load, not mid-request).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from triphase.workers.models.config import FULL, SLIDING, ModelConfig, MoeConfig, RopeScaling, rope_scaling_from_dict

# model_type in config.json -> the family name ModelConfig.architecture carries
HF_ARCHITECTURES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3",
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_QWEN = ("qwen2", "qwen3", "qwen3_moe")


def hf_config(raw: dict[str, Any], model_type: str, name: str, eos_ids: tuple[int, ...]) -> ModelConfig:
    """Raises KeyError, TypeError or ValueError (the loader names the file) for a missing or invalid
    field, or a setting the engine does not implement."""
    arch = HF_ARCHITECTURES[model_type]
    gemma = arch == "gemma3"
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    layers = int(raw["num_hidden_layers"])
    head_dim = int(raw.get("head_dim") or (256 if gemma else hidden // heads))
    act = str(raw.get("hidden_act") or raw.get("hidden_activation") or ("gelu_pytorch_tanh" if gemma else "silu"))
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} (supported: {', '.join(ACTIVATIONS)})")
    if raw.get("attn_logit_softcapping") is not None:
        raise ValueError("attn_logit_softcapping is not supported")
    if float((raw.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor other than 1 is not supported")
    theta, scaling, local_theta = _rope(raw, gemma)
    window = raw.get("sliding_window")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        rope_scaling=scaling,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=name,
        hidden_act=act,
        qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
        norm_plus_one=gemma,
        sandwich_norm=gemma,
        embedding_scale=math.sqrt(hidden) if gemma else 1.0,
        attention_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
        final_logit_softcapping=raw.get("final_logit_softcapping"),
        sliding_window=None if window is None else int(window),
        layer_types=_layer_types(raw, arch, layers),
        local_rope_theta=local_theta,
        moe=_moe(raw, arch, layers),
    )


def _rope(raw: dict[str, Any], gemma: bool) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, scaling) of the global layers and the theta of Gemma 3's sliding layers. transformers
    >= 5 writes `rope_parameters` (per layer type for Gemma 3); older configs `rope_theta`,
    `rope_scaling` and Gemma's `rope_local_base_freq`."""
    params = raw.get("rope_parameters") or {}
    if gemma:
        full = params.get("full_attention") or {**(raw.get("rope_scaling") or {}),
                                                 "rope_theta": raw.get("rope_theta", 1_000_000.0)}
        local = params.get("sliding_attention") or {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
        if rope_scaling_from_dict(local) is not None:
            raise ValueError("rope scaling of the sliding layers is not supported")
        return float(full["rope_theta"]), rope_scaling_from_dict(full), float(local["rope_theta"])
    default_theta = 1_000_000.0 if raw.get("model_type") == "mixtral" else 10_000.0
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    return theta, rope_scaling_from_dict(raw.get("rope_scaling") or params), None


def _layer_types(raw: dict[str, Any], arch: str, layers: int) -> tuple[str, ...]:
    """Which layers slide: config.json's `layer_types` when written (transformers >= 5), else each
    family's rule in transformers: Gemma 3 every layer but each `sliding_window_pattern`-th; Qwen the
    layers from `max_window_layers` on, with `use_sliding_window`; Mistral, Mixtral and Phi-3 every
    layer when `sliding_window` is set."""
    written = raw.get("layer_types")
    if written is not None:
        types = tuple(str(t) for t in written)
        if len(types) != layers or not set(types) <= {FULL, SLIDING}:
            raise ValueError(f"layer_types must be {layers} of {FULL!r} or {SLIDING!r}")
    elif arch == "gemma3":
        pattern = int(raw.get("sliding_window_pattern", 6))
        types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))
    elif arch in _QWEN:
        start = int(raw.get("max_window_layers", layers))
        slide = raw.get("use_sliding_window") and raw.get("sliding_window") is not None
        types = tuple(SLIDING if slide and i >= start else FULL for i in range(layers))
    else:
        types = (SLIDING if raw.get("sliding_window") is not None else FULL,) * layers
    if SLIDING in types and raw.get("sliding_window") is None:
        raise ValueError("layer_types has sliding layers but sliding_window is not set")
    return types if SLIDING in types else ()


def _moe(raw: dict[str, Any], arch: str, layers: int) -> MoeConfig | None:
    if arch == "mixtral":
        return MoeConfig(num_experts=int(raw["num_local_experts"]), top_k=int(raw["num_experts_per_tok"]),
                         intermediate_size=int(raw["intermediate_size"]), normalize_top_k=True,
                         layers=tuple(range(layers)))
    if arch == "qwen3_moe":
        experts = int(raw.get("num_experts") or raw["num_local_experts"])
        dense = {int(i) for i in raw.get("mlp_only_layers") or ()}
        step = int(raw.get("decoder_sparse_step", 1))
        return MoeConfig(num_experts=experts, top_k=int(raw["num_experts_per_tok"]),
                         intermediate_size=int(raw["moe_intermediate_size"]),
                         normalize_top_k=bool(raw.get("norm_topk_prob", False)),
                         layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0))
    return None


# Mixtral names its experts' matrices w1 (gate), w3 (up), w2 (down) under `block_sparse_moe`.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\."), r".mlp.experts.\1.gate_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\."), r".mlp.experts.\1.up_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\."), r".mlp.experts.\1.down_proj."),
    (re.compile(r"\.block_sparse_moe\.gate\."), r".mlp.gate."),
)


def hf_tensor_name(name: str) -> str:
    if ".block_sparse_moe." in name:
        for pattern, replacement in _RENAMES:
            name = pattern.sub(replacement, name)
    return name


def split_fused(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Phi-3 keeps q|k|v in `qkv_proj` and gate|up in `gate_up_proj`: split them, in place."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    for key in [k for k in weights if k.endswith((".qkv_proj.weight", ".gate_up_proj.weight"))]:
        fused = weights.pop(key)
        parts: tuple[str, ...]
        if key.endswith(".qkv_proj.weight"):
            parts, sizes = ("q_proj", "k_proj", "v_proj"), [q, kv, kv]
        else:
            parts, sizes = ("gate_proj", "up_proj"), [fused.shape[0] // 2] * 2
        if fused.shape[0] != sum(sizes):
            raise ValueError(f"{key} has {fused.shape[0]} rows, expected {sum(sizes)}")
        stem = key.rsplit(".", 2)[0]
        for part, tensor in zip(parts, fused.split(sizes), strict=True):
            weights[f"{stem}.{part}.weight"] = tensor


def layer_tensors(config: ModelConfig, index: int) -> list[str]:
    """The tensors layer `index` must hold."""
    names = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj"]
    if config.qk_norm:
        names += ["self_attn.q_norm", "self_attn.k_norm"]
    if config.sandwich_norm:
        names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    moe = config.moe
    if moe is not None and index in moe.layers:
        names.append("mlp.gate")
        names += [f"mlp.experts.{e}.{m}" for e in range(moe.num_experts) for m in ("gate_proj", "up_proj", "down_proj")]
    else:
        names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return [f"model.layers.{index}.{n}.weight" for n in names]

