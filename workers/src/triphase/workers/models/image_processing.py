"""Decoded images -> the pixel tensor a vision tower takes, as a Hugging Face directory's
preprocessor_config.json describes it (the CLIP and SigLIP image processors): resize (the shortest
edge, or to an exact size), center crop, rescale to [0, 1], normalize per channel.

Resizing is PIL's, on 8-bit RGB, as transformers' PIL backend does it, so the pixels match it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    shortest_edge: int | None  # resize so the short side is this long, keeping the aspect ratio
    size: tuple[int, int] | None  # or resize to exactly (height, width)
    crop: tuple[int, int] | None  # then center-crop to (height, width)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dir(cls, folder: pathlib.Path, image_size: int, kind: str) -> ImageProcessor:
        """Read preprocessor_config.json; without one, the defaults of the tower's own processor."""
        path = folder / "preprocessor_config.json"
        raw: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        return cls.from_dict(raw, image_size, kind)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], image_size: int, kind: str) -> ImageProcessor:
        siglip = kind == "siglip"
        size = raw.get("size") or ({"height": image_size, "width": image_size} if siglip
                                   else {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size} if not siglip else {"height": size, "width": size}
        crop = raw.get("crop_size") or {"height": image_size, "width": image_size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do_resize, do_crop = raw.get("do_resize", True), raw.get("do_center_crop", not siglip)
        half = (0.5, 0.5, 0.5)
        return cls(
            shortest_edge=int(size["shortest_edge"]) if do_resize and "shortest_edge" in size else None,
            size=(int(size["height"]), int(size["width"])) if do_resize and "height" in size else None,
            crop=(int(crop["height"]), int(crop["width"])) if do_crop else None,
            resample=int(raw.get("resample", Image.Resampling.BILINEAR if siglip else Image.Resampling.BICUBIC)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0,
            mean=tuple(raw.get("image_mean", half if siglip else CLIP_MEAN)) if raw.get("do_normalize", True)
            else (0.0, 0.0, 0.0),
            std=tuple(raw.get("image_std", half if siglip else CLIP_STD)) if raw.get("do_normalize", True)
            else (1.0, 1.0, 1.0),
        )

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, 3, H, W] float32 pixels for RGB images."""
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: Image.Image) -> torch.Tensor:
        if self.shortest_edge is not None:
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            image = image.resize((new_short, new_long) if width <= height else (new_long, new_short),
                                 resample=self.resample)
        elif self.size is not None:
            image = image.resize((self.size[1], self.size[0]), resample=self.resample)
        if self.crop is not None:
            height, width = self.crop
            top, left = (image.height - height) // 2, (image.width - width) // 2
            image = image.crop((left, top, left + width, top + height))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        pixels = pixels * self.rescale_factor
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std
