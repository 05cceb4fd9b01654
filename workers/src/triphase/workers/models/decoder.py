"""Decoder-only transformers in plain torch: the Llama family (Llama 2/3, SmolLM, Mistral, Qwen2),
Qwen3 and Qwen3-MoE, Mixtral, Gemma 3 (text) and Phi-3/Phi-4.

One forward pass covers them all; `ModelConfig` says what differs: RMSNorm (Gemma: times 1 + w, and
also after attention and MLP), q/k head norms (Qwen3, Gemma 3), rotary embeddings (plain, linear- or
Llama-3-scaled; a second base for Gemma 3's sliding layers), grouped-query attention over the paged
KV cache (a sliding window on the layers that have one), a gated MLP (SiLU or tanh-GELU) or a sparse
mixture of experts (moe.py), tied or untied embeddings (Gemma scales them), optional logit
soft-capping. Weights arrive with Hugging Face names (see loader.py; Phi-3's fused matrices are split
there); q/k/v and gate/up are fused into single matrices at construction so a decode step issues few,
large matmuls. The layout of each matrix depends on its dtype (see `Linear`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from triphase.workers.models.attention import AttentionBatch, paged_attention
from triphase.workers.models.config import ModelConfig, RopeScaling
from triphase.workers.models.moe import ExpertLoad, SparseMoe
from triphase.workers.models.quant import Int4Linear, Q4Blocks, concat_rows

_CPU = torch.device("cpu")

def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x / rms(x) * weight on the float32 residual stream, returned in the compute dtype."""
    return F.rms_norm(x, x.shape[-1:], weight, eps).to(dtype)


class Linear:
    """y = x W^T (+ b). On the CPU, dense float32 weights are stored transposed ([in, out], contiguous)
    and applied as `x @ w` (measured faster for a batch-1 float32 step on older torch builds, never
    slower); 16-bit ones, and every weight on a GPU (cuBLAS's native layout), keep [out, in] and go
    through `F.linear`: torch's CPU kernels for a transposed
    bfloat16 operand run about 10x slower at every row count (torch 2.15, AVX2: 33 rows 44 ms against
    4 ms for one SmolLM2 MLP matrix), which made every bfloat16 prefill take seconds. Small steps are
    bandwidth-bound, so they may use a kernel that reads fewer bytes or reads them faster: the packed
    int4 kernel when 4-bit GGUF blocks are available (steps of at most `int4_max_tokens` rows), or,
    for one row, a float16 copy (`single_row_f16`: torch's f16 GEMV streams ~2x faster than its bf16
    one on this class of CPU, but is slow for more rows)."""

    __slots__ = ("bias", "int4", "int4_max_tokens", "transposed", "weight", "weight_f16")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 q4: Q4Blocks | None = None, int4_max_tokens: int = 0, single_row_f16: bool = False,
                 device: torch.device = _CPU) -> None:
        self.transposed = weight.dtype == torch.float32 and device.type == "cpu"
        weight = weight.to(device)
        self.weight = weight.t().contiguous() if self.transposed else weight.contiguous()
        self.bias = None if bias is None else bias.to(device)
        self.int4 = Int4Linear(q4) if q4 is not None and int4_max_tokens > 0 else None
        self.int4_max_tokens = int4_max_tokens
        self.weight_f16 = weight.to(torch.float16).contiguous() if single_row_f16 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.int4 is not None and rows <= self.int4_max_tokens:
            out = self.int4(x)
        elif self.weight_f16 is not None and rows == 1:
            out = F.linear(x.to(torch.float16), self.weight_f16).to(x.dtype)
        elif self.transposed:
            out = x @ self.weight
        else:
            out = F.linear(x, self.weight)
        return out if self.bias is None else out + self.bias

    @property
    def nbytes_small_step(self) -> int:
        """Bytes of weights a one-row step reads."""
        if self.int4 is not None:
            return self.int4.nbytes
        weight = self.weight_f16 if self.weight_f16 is not None else self.weight
        return weight.numel() * weight.element_size()


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class _Layer:
    __slots__ = ("attn_norm", "attn_post_norm", "down", "gate_up", "k_norm", "mlp_norm", "mlp_post_norm", "moe",
                 "o", "q_norm", "qkv", "window")

    def __init__(self, config: ModelConfig, index: int, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 quantized: dict[str, Q4Blocks], int4_max_tokens: int, device: torch.device,
                 load: ExpertLoad) -> None:
        prefix = f"model.layers.{index}."

        def w(name: str) -> torch.Tensor:
            return weights[prefix + name].to(dtype)

        def norm(name: str) -> torch.Tensor:
            weight = weights[prefix + name].float()
            return (weight + 1 if config.norm_plus_one else weight).to(device)

        def fused(*names: str, bias: bool = False) -> Linear:
            """One Linear over the row-concatenation of several matrices (q|k|v, gate|up)."""
            weight = torch.cat([w(f"{n}.weight") for n in names])
            b = torch.cat([w(f"{n}.bias") for n in names]) if bias else None
            blocks = [quantized.get(f"{prefix}{n}.weight") for n in names]
            q4 = concat_rows([x for x in blocks if x is not None]) if all(x is not None for x in blocks) else None
            return Linear(weight, b, q4=q4, int4_max_tokens=int4_max_tokens, device=device)

        self.window = config.window(index)
        self.attn_norm = norm("input_layernorm.weight")
        # Gemma 3 norms each sublayer's output too; its MLP input norm is then `pre_feedforward`.
        self.attn_post_norm = norm("post_attention_layernorm.weight") if config.sandwich_norm else None
        self.mlp_norm = norm("pre_feedforward_layernorm.weight" if config.sandwich_norm
                             else "post_attention_layernorm.weight")
        self.mlp_post_norm = norm("post_feedforward_layernorm.weight") if config.sandwich_norm else None
        self.q_norm = norm("self_attn.q_norm.weight") if config.qk_norm else None
        self.k_norm = norm("self_attn.k_norm.weight") if config.qk_norm else None
        has_bias = prefix + "self_attn.q_proj.bias" in weights
        self.qkv = fused("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", bias=has_bias)
        self.o = fused("self_attn.o_proj")
        self.moe: SparseMoe | None = None
        self.gate_up: Linear | None = None
        self.down: Linear | None = None
        moe = config.moe
        if moe is not None and index in moe.layers:
            experts = range(moe.num_experts)
            gate_up = torch.stack([torch.cat([w(f"mlp.experts.{e}.gate_proj.weight"),
                                              w(f"mlp.experts.{e}.up_proj.weight")]) for e in experts])
            down = torch.stack([w(f"mlp.experts.{e}.down_proj.weight") for e in experts])
            self.moe = SparseMoe(moe, w("mlp.gate.weight").to(device), gate_up.to(device), down.to(device),
                                 _ACTIVATIONS[config.hidden_act], load)
        else:
            self.gate_up = fused("mlp.gate_proj", "mlp.up_proj")
            self.down = fused("mlp.down_proj")


class DecoderModel:
    """Forward pass over a flat batch of new tokens; see attention.py for the batch layout.

    Every tensor lives on `device`: the weights are built on the host (fused, laid out) one matrix at a
    time and moved, so the device never holds an unfused copy. The forward pass never reads a value
    back from the device (but a sparse layer's per-expert counts, see moe.py); the caller passes what
    it knows on the host (`max_position`)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 quantized: dict[str, Q4Blocks] | None = None, int4_max_tokens: int = 0,
                 device: torch.device = _CPU) -> None:
        if device.type != "cpu" and int4_max_tokens:
            raise ValueError("the packed int4 kernel is the CPU one: dequantize the weights on a GPU")
        self.config = config
        self.dtype = dtype
        self.device = device
        self.embed = weights["model.embed_tokens.weight"].to(dtype).to(device).contiguous()
        norm = weights["model.norm.weight"].float()
        self.norm = (norm + 1 if config.norm_plus_one else norm).to(device)
        lm_head = weights.get("lm_head.weight")
        head = self.embed if lm_head is None or config.tie_word_embeddings else lm_head.to(dtype)
        # In the int4 (speed) mode the one-row LM head also takes the faster float16 GEMV.
        self.lm_head = Linear(head, single_row_f16=int4_max_tokens > 0, device=device)
        self.expert_load = ExpertLoad()
        self.layers = [_Layer(config, i, weights, dtype, quantized or {}, int4_max_tokens, device, self.expert_load)
                       for i in range(config.num_hidden_layers)]
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim
        self.scale = config.attention_scale or config.head_dim ** -0.5
        self.act = _ACTIVATIONS[config.hidden_act]
        # The embedding scale is applied in the compute dtype, as transformers does (Gemma).
        self.embedding_scale = torch.tensor(config.embedding_scale, dtype=dtype).item()
        # One rotary table per distinct base: the global one, and Gemma 3's sliding layers' own.
        self._ropes = {"global": _Rope(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))}
        if config.local_rope_theta is not None:
            self._ropes["local"] = _Rope(rope_inv_freq(config.head_dim, config.local_rope_theta, None))
        self._layer_rope = ["local" if config.local_rope_theta is not None and layer.window else "global"
                            for layer in self.layers]
        for rope in self._ropes.values():
            rope.ensure(config.max_position_embeddings, dtype, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: torch.Tensor, logits_indices: torch.Tensor,
                embeds: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                max_position: int | None = None) -> torch.Tensor:
        """Returns float32 logits [len(logits_indices), vocab] for the selected token rows. `embeds`:
        (rows, values) written over those rows' token embeddings (an image's placeholders).
        `max_position`: the largest of `positions`, when the caller knows it (saves a device read)."""
        cfg = self.config
        n = input_ids.shape[0]
        length = (int(positions.max()) if max_position is None else max_position) + 1
        tables = {}
        for key, rope in self._ropes.items():
            rope.ensure(length, self.dtype, self.device)
            tables[key] = (rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1))  # [T, 1, D]
        # The residual stream stays float32 whatever the compute dtype: summing 60 sublayer outputs
        # in bfloat16 loses ~2 significant bits, enough to flip near-tied tokens of a small model.
        h = F.embedding(input_ids, self.embed)
        h = (h * self.embedding_scale if self.embedding_scale != 1.0 else h).float()
        if embeds is not None:
            h[embeds[0]] = embeds[1].float()
        dtype, eps = self.dtype, cfg.rms_norm_eps
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qk_size, half = self.q_size + self.kv_size, dim // 2
        for index, layer in enumerate(self.layers):
            x = rms_norm(h, layer.attn_norm, eps, dtype)
            qkv = layer.qkv(x)
            qk = qkv[:, :qk_size].view(n, heads + kv_heads, dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                qk[:, :heads] = rms_norm(qk[:, :heads], layer.q_norm, eps, dtype)
                qk[:, heads:] = rms_norm(qk[:, heads:], layer.k_norm, eps, dtype)
            # Rotate q and k together, in place, so k|v stay adjacent for a single cache write.
            cos, sin = tables[self._layer_rope[index]]
            qk.copy_(qk * cos + qk.roll(half, dims=-1) * sin)
            q = qkv[:, : self.q_size].view(n, heads, dim)
            kv = qkv[:, self.q_size :].view(n, 2, kv_heads, dim)
            attn = paged_attention(q, kv, kv_cache[:, index], batch, self.scale, layer.window)
            out = layer.o(attn.reshape(n, self.q_size))
            h = h + (out if layer.attn_post_norm is None else rms_norm(out, layer.attn_post_norm, eps, torch.float32))
            x = rms_norm(h, layer.mlp_norm, eps, dtype)
            if layer.moe is not None:
                out = layer.moe(x)
            else:
                assert layer.gate_up is not None and layer.down is not None
                gate, up = layer.gate_up(x).chunk(2, dim=-1)
                out = layer.down(self.act(gate) * up)
            h = h + (out if layer.mlp_post_norm is None else rms_norm(out, layer.mlp_post_norm, eps, torch.float32))
        h = rms_norm(h[logits_indices], self.norm, eps, dtype)
        logits = self.lm_head(h).float()
        cap = cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class _Rope:
    """cos and sign-folded sin tables: rotate_half(x) * sin == x.roll(D/2) * [-sin, sin]. Computed on
    the host in float32 (the same numbers on every device), then moved; grown on demand."""

    __slots__ = ("cos", "inv_freq", "sin")

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def ensure(self, length: int, dtype: torch.dtype, device: torch.device) -> None:
        if self.cos.shape[0] >= length:
            return
        t = torch.arange(length, dtype=torch.int64).float()
        freqs = torch.outer(t, self.inv_freq)
        self.cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(dtype).to(device)
        self.sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(dtype).to(device)
