"""The Llama family in plain torch: Llama 2/3, SmolLM, Mistral-style and Qwen2 (qkv bias).

RMSNorm, rotary embeddings (plain, linear- or Llama-3-scaled), grouped-query attention over the
paged KV cache, SwiGLU MLP, tied or untied embeddings. Weights arrive with Hugging Face names
(see loader.py); q/k/v and gate/up are fused into single matrices at construction so a decode
step issues few, large matmuls. Matrices are stored transposed ([in, out], contiguous) and applied
as `x @ w`: on CPU that runs a batch-1 float32 step about twice as fast as `F.linear` on the
[out, in] layout (measured: 17.7 vs 9.1 GB/s of weights; see BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from triphase.workers.models.attention import AttentionBatch, paged_attention
from triphase.workers.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous()


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x @ weight_t
    return out if bias is None else out + bias


class _Layer:
    __slots__ = ("attn_norm", "down", "gate_up", "mlp_norm", "o", "qkv", "qkv_bias")

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> None:
        def w(name: str) -> torch.Tensor:
            return weights[prefix + name].to(dtype).contiguous()

        self.attn_norm = w("input_layernorm.weight")
        self.mlp_norm = w("post_attention_layernorm.weight")
        self.qkv = _transposed(torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"),
                                          w("self_attn.v_proj.weight")]))
        self.qkv_bias = None
        if prefix + "self_attn.q_proj.bias" in weights:
            self.qkv_bias = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"),
                                       w("self_attn.v_proj.bias")]).contiguous()
        self.o = _transposed(w("self_attn.o_proj.weight"))
        self.gate_up = _transposed(torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]))
        self.down = _transposed(w("mlp.down_proj.weight"))


class LlamaModel:
    """Forward pass over a flat batch of new tokens; see attention.py for the batch layout."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.config = config
        self.dtype = dtype
        self.embed = weights["model.embed_tokens.weight"].to(dtype).contiguous()
        self.norm = weights["model.norm.weight"].to(dtype)
        lm_head = weights.get("lm_head.weight")
        head = self.embed if lm_head is None or config.tie_word_embeddings else lm_head.to(dtype)
        self.lm_head = _transposed(head)
        self.layers = [_Layer(weights, f"model.layers.{i}.", dtype) for i in range(config.num_hidden_layers)]
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        self._inv_freq = rope_inv_freq(config)
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        self._ensure_rope(config.max_position_embeddings)

    def _ensure_rope(self, length: int) -> None:
        if self._cos.shape[0] >= length:
            return
        t = torch.arange(length, dtype=torch.int64).float()
        freqs = torch.outer(t, self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.dtype)
        self._sin = emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits [len(logits_indices), vocab] for the selected token rows."""
        cfg = self.config
        n = input_ids.shape[0]
        self._ensure_rope(int(positions.max()) + 1)
        cos = self._cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self._sin[positions].unsqueeze(1)
        h = F.embedding(input_ids, self.embed)
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for index, layer in enumerate(self.layers):
            x = rms_norm(h, layer.attn_norm, cfg.rms_norm_eps)
            qkv = _linear(x, layer.qkv, layer.qkv_bias)
            q = qkv[:, : self.q_size].view(n, heads, dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, kv_heads, dim)
            v = qkv[:, self.q_size + self.kv_size :].view(n, kv_heads, dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            attn = paged_attention(q, k, v, kv_cache[:, index], batch, self.scale)
            h = h + _linear(attn.reshape(n, self.q_size), layer.o)
            x = rms_norm(h, layer.mlp_norm, cfg.rms_norm_eps)
            gate, up = _linear(x, layer.gate_up).chunk(2, dim=-1)
            h = h + _linear(F.silu(gate) * up, layer.down)
        h = rms_norm(h[logits_indices], self.norm, cfg.rms_norm_eps)
        return _linear(h, self.lm_head).float()


FAMILIES = {"llama": LlamaModel, "qwen2": LlamaModel}
