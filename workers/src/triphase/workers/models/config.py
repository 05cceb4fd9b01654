"""The architecture description every model family and loader agrees on.

Loaders translate their own metadata (GGUF keys, HF config.json) into `ModelConfig`; model
code reads only this. Field names follow the Hugging Face Llama config where one exists.
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" or "qwen2"
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
        return (layers * per_layer + lm_head + h) * dtype_bytes


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
