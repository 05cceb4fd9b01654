"""The vision side of a LLaVA-style model's config.json, read by the workers (to build the encoder)
and the router (to know the image placeholder token and how many positions an image takes)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from triphase.common.errors import UserError

ACTIVATION_NAMES = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str  # "clip", "siglip" or "mobilenet_v2" (the offline demo's backbone)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    # The LLaVA wrapper's settings
    image_token_id: int
    feature_layers: tuple[int, ...] = (-2,)
    feature_strategy: str = "default"  # "default" drops the first token, "full" keeps it
    projector_act: str = "gelu"
    num_channels: int = 3

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (1 if self.kind == "clip" else 0)

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens (and embedding rows) one image takes in the prompt."""
        return self.num_positions - (1 if self.feature_strategy == "default" else 0)

    @property
    def layers_needed(self) -> int:
        """Encoder layers to run: hidden state i is the output of layer i (0: the embeddings)."""
        return max(layer % (self.num_hidden_layers + 1) for layer in self.feature_layers)


def vision_config_from_hf(raw: dict[str, Any]) -> VisionConfig:
    """The vision settings of a LLaVA config.json (KeyError/ValueError/TypeError when malformed)."""
    vision = raw["vision_config"]
    kind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip",
            "mobilenet_v2": "mobilenet_v2"}.get(vision.get("model_type", ""))
    if kind is None:
        raise ValueError(f"vision model {vision.get('model_type')!r} (supported: clip_vision_model, "
                         "siglip_vision_model, mobilenet_v2)")
    if kind == "mobilenet_v2":  # a convolutional backbone: its 32x downsampled grid is the image's tokens
        vision = {"hidden_size": 1280, "intermediate_size": 0, "num_hidden_layers": 0, "num_attention_heads": 1,
                  "patch_size": 32, "hidden_act": "relu", **vision}
        raw = {**raw, "vision_feature_layer": 0, "vision_feature_select_strategy": "full"}
    layers = raw.get("vision_feature_layer", -2)
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} (supported: default, full)")
    hidden_act = vision.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
    projector_act = raw.get("projector_hidden_act", "gelu")
    for act in (hidden_act, projector_act):
        if act not in ACTIVATION_NAMES:
            raise ValueError(f"activation {act!r} (supported: {', '.join(ACTIVATION_NAMES)})")
    config = VisionConfig(
        kind=kind,
        hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]),
        num_hidden_layers=int(vision["num_hidden_layers"]),
        num_attention_heads=int(vision["num_attention_heads"]),
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)),
        hidden_act=hidden_act,
        image_token_id=int(raw["image_token_id"] if "image_token_id" in raw else raw["image_token_index"]),
        feature_layers=tuple(int(x) for x in (layers if isinstance(layers, list) else [layers])),
        feature_strategy=strategy,
        projector_act=projector_act,
        num_channels=int(vision.get("num_channels", 3)),
    )
    if config.image_size % config.patch_size:
        raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    if any(not -config.num_hidden_layers - 1 <= x <= config.num_hidden_layers for x in config.feature_layers):
        raise ValueError(f"vision_feature_layer {layers} is outside the tower's {config.num_hidden_layers} layers")
    return config


def vision_config_of(path: str) -> VisionConfig | None:
    """The vision settings of the model at `path` (a resolved GGUF file or HF directory); None for a
    model that takes no images. UserError for a LLaVA config this code cannot run."""
    config = pathlib.Path(path) / "config.json"
    if not os.path.isdir(path) or not config.exists():
        return None
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "llava":
        return None
    try:
        return vision_config_from_hf(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{config}: unsupported or invalid LLaVA vision settings ({exc})") from None
