"""Images in a prompt, as the engine takes them: placeholder runs (`ImageSpan`) with their embeddings.

A prompt carries one run of `image_token_id` per image, `tokens_per_image` long (the router expands
each image's single placeholder). The embeddings come from the vision encoder, here or on an encode
worker; the model runner writes them over the placeholders' token embeddings. An imported request
(its KV computed elsewhere) carries spans without embeddings: its prefix-cache hashes still need the
images' digests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from triphase.common.block_hash import ImageSpan


@dataclasses.dataclass(frozen=True)
class ImageInput:
    span: ImageSpan
    embeds: torch.Tensor | None = None  # [span.length, hidden]; None when only the KV moves


def check_images(token_ids: Sequence[int], images: Sequence[ImageInput], image_token_id: int | None,
                 hidden_size: int, need_embeds: bool) -> None:
    """ValueError unless every image is a run of `image_token_id` inside the prompt, the runs are in
    order and disjoint, and (when `need_embeds`) each has [length, hidden_size] embeddings."""
    if not images:
        return
    if image_token_id is None:
        raise ValueError("this model takes no images")
    previous_end = 0
    for index, image in enumerate(images):
        span = image.span
        if span.length < 1 or span.offset < previous_end or span.end > len(token_ids):
            raise ValueError(f"image {index}: positions {span.offset}..{span.end} are not inside the prompt, "
                             "in order and disjoint")
        if any(token_ids[p] != image_token_id for p in range(span.offset, span.end)):
            raise ValueError(f"image {index}: the prompt does not hold image tokens at {span.offset}..{span.end}")
        if need_embeds and (image.embeds is None or tuple(image.embeds.shape) != (span.length, hidden_size)):
            shape = None if image.embeds is None else tuple(image.embeds.shape)
            raise ValueError(f"image {index}: embeddings of shape {shape}, expected {(span.length, hidden_size)}")
        previous_end = span.end


def overlapping_rows(images: Sequence[ImageSpan], embeds: Sequence[torch.Tensor], start: int, count: int,
                     offset: int) -> tuple[list[int], list[torch.Tensor]]:
    """For a chunk of prompt positions [start, start + count) placed at batch row `offset`: the batch
    rows that hold image positions and the embedding rows that go there."""
    rows: list[int] = []
    parts: list[torch.Tensor] = []
    for span, rows_of_image in zip(images, embeds, strict=True):
        low, high = max(span.offset, start), min(span.end, start + count)
        if low < high:
            rows.extend(range(offset + low - start, offset + high - start))
            parts.append(rows_of_image[low - span.offset : high - span.offset])
    return rows, parts
