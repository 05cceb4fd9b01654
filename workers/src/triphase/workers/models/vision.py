"""The vision side of a LLaVA-style model in plain torch: a CLIP or SigLIP vision transformer (or, for
the offline demo, a MobileNetV2 backbone: mobilenet.py) and the MLP projector that maps its features
into the language model's embedding width.

`VisionEncoder(pixels)` takes preprocessed images [N, 3, H, W] (see image_processing.py) and returns
[N, tokens_per_image, text_hidden]: the rows the prefill splices in at the image's placeholder
tokens. As in LLaVA, features are the hidden states after `feature_layers` (negative: from the end;
several are concatenated), without the first (CLS) token under the "default" strategy, and
`post_layernorm` is not applied. Only the layers the features need are run. Weights arrive with the
names loader.py gives them: `vision.*` (the tower) and `projector.*`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from triphase.common.models.vision import ACTIVATION_NAMES, VisionConfig
from triphase.workers.models.mobilenet import MobileNetV2

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES), "the config's accepted names are the ones implemented here"


Affine = tuple[torch.Tensor, torch.Tensor]  # (weight, bias)


def _optional(weights: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor | None:
    return weights[name].to(dtype) if name in weights else None


class _Layer:
    """One pre-norm transformer layer of the tower; q, k and v fused into one matrix."""

    __slots__ = ("fc1", "fc2", "norm1", "norm2", "out", "qkv")

    def __init__(self, w: Callable[[str], torch.Tensor], prefix: str) -> None:
        def affine(name: str) -> Affine:
            return w(f"{prefix}{name}.weight"), w(f"{prefix}{name}.bias")

        self.norm1, self.norm2 = affine("layer_norm1"), affine("layer_norm2")
        projections = [affine(f"self_attn.{n}_proj") for n in "qkv"]
        self.qkv = torch.cat([p[0] for p in projections]), torch.cat([p[1] for p in projections])
        self.out, self.fc1, self.fc2 = affine("self_attn.out_proj"), affine("mlp.fc1"), affine("mlp.fc2")


class VisionEncoder:
    """Vision tower + projector: pixels [N, C, H, W] -> embeddings [N, tokens_per_image, text_hidden]."""

    def __init__(self, config: VisionConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.config = config
        self.dtype = dtype
        self.proj1 = (weights["projector.linear_1.weight"].to(dtype), _optional(weights, "projector.linear_1.bias",
                                                                                  dtype))
        self.proj2 = (weights["projector.linear_2.weight"].to(dtype), _optional(weights, "projector.linear_2.bias",
                                                                                  dtype))
        self.projector_act = ACTIVATIONS[config.projector_act]
        self.backbone = MobileNetV2(weights, dtype) if config.kind == "mobilenet_v2" else None
        if self.backbone is not None:
            return

        def w(name: str) -> torch.Tensor:
            return weights[name].to(dtype)

        def opt(name: str) -> torch.Tensor | None:
            return _optional(weights, name, dtype)

        self.patch = w("vision.embeddings.patch_embedding.weight")
        self.patch_bias = opt("vision.embeddings.patch_embedding.bias")
        self.cls = opt("vision.embeddings.class_embedding")
        self.positions = w("vision.embeddings.position_embedding.weight")
        self.pre_norm = (w("vision.pre_layrnorm.weight"), w("vision.pre_layrnorm.bias")) \
            if "vision.pre_layrnorm.weight" in weights else None
        self.layers = [_Layer(w, f"vision.encoder.layers.{i}.") for i in range(config.layers_needed)]
        self.act = ACTIVATIONS[config.hidden_act]

    @property
    def output_size(self) -> int:
        return int(self.proj2[0].shape[0])

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixels) if self.backbone is not None else self._transformer(pixels)
        return F.linear(self.projector_act(F.linear(features, *self.proj1)), *self.proj2)

    def _transformer(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = pixels.shape[0]
        x = F.conv2d(pixels.to(self.dtype), self.patch, self.patch_bias, stride=cfg.patch_size)
        x = x.flatten(2).transpose(1, 2)  # [N, patches, hidden]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(n, 1, -1), x], dim=1)
        x = x + self.positions[: x.shape[1]]
        if self.pre_norm is not None:
            x = F.layer_norm(x, x.shape[-1:], *self.pre_norm, cfg.layer_norm_eps)
        states = [x]
        heads = cfg.num_attention_heads
        for layer in self.layers:
            h = F.layer_norm(x, x.shape[-1:], *layer.norm1, cfg.layer_norm_eps)
            q, k, v = F.linear(h, *layer.qkv).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + F.linear(attn, *layer.out)
            h = F.layer_norm(x, x.shape[-1:], *layer.norm2, cfg.layer_norm_eps)
            x = x + F.linear(self.act(F.linear(h, *layer.fc1)), *layer.fc2)
            states.append(x)
        picked = [states[i % (cfg.num_hidden_layers + 1)] for i in cfg.feature_layers]
        if cfg.feature_strategy == "default":
            picked = [s[:, 1:] for s in picked]
        return torch.cat(picked, dim=-1)
