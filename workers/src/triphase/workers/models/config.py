"""The architecture description every model family and loader agrees on.

Loaders translate their own metadata (GGUF keys, HF config.json) into `ModelConfig`; model
code reads only this. Field names follow the Hugging Face Llama config where one exists. The
families differ by a few switches (q/k norms, Gemma's norms and scaled embeddings, sliding-window
layers, sparse expert MLPs); each has a default that is the Llama behaviour.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling: "linear" or Llama 3's "llama3"."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): each token goes to its `top_k` experts
    by the router's softmax; their outputs are summed, weighted by those probabilities (renormalised
    over the chosen k when `normalize_top_k`)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    normalize_top_k: bool
    layers: tuple[int, ...]  # the layers whose MLP is sparse (the others are dense)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a family: a value of families.HF_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q, k, v projections (Qwen2)
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma)
    qk_norm: bool = False  # RMSNorm of each query and key head before rotary (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # Gemma: norms scale by (1 + weight)
    sandwich_norm: bool = False  # Gemma 3: attention and MLP outputs normed too before the residual add
    embedding_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included
    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer; () means every layer is FULL
    local_rope_theta: float | None = None  # rotary base of the sliding layers when it differs (Gemma 3)
    moe: MoeConfig | None = None

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None when it attends to the whole context."""
        if self.layer_types and self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None

    @property
    def uniform_window(self) -> int | None:
        """The sliding window when every layer slides (then KV older than it is never read again)."""
        if self.layer_types and all(t == SLIDING for t in self.layer_types):
            return self.sliding_window
        return None

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def weight_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of weights one decode step reads (every matrix once; embedding rows are negligible)."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        lm_head = self.vocab_size * h
        total = layers * per_layer + lm_head + h
        if self.moe is not None:  # a sparse layer reads the experts one token touches, not a dense MLP
            moe = self.moe
            total += len(moe.layers) * (moe.top_k * 3 * h * moe.intermediate_size + moe.num_experts * h - 3 * h * i)
        return total * dtype_bytes


def rope_scaling_from_dict(raw: dict[str, Any] | None) -> RopeScaling | None:
    """Parse HF's `rope_scaling` dict; `None` or type "default" means no scaling."""
    if not raw:
        return None
    kind = str(raw.get("rope_type") or raw.get("type") or "default")
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    return RopeScaling(
        kind=kind,
        factor=float(raw.get("factor", 1.0)),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
