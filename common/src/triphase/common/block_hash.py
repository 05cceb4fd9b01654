"""The chained block hash shared by the engine's prefix cache and the router's cache-aware placement.

Process-independent (blake2b, not Python's salted hash) so a router can compute the hashes of a
prompt's blocks and compare them with the hashes a worker reports. An image in the prompt is a run
of identical placeholder tokens (`ImageSpan`); every block that overlaps one folds the image's
content digest into its hash, so the same text around a different image is a different prefix.

A deployment salts its chains (`salted_root`: the first block's parent is derived from a secret the
router and the workers share), so the hashes a worker publishes say nothing about prompts to whoever
lacks the salt: without it no one can compute the hash of a guessed prompt to test for it."""

from __future__ import annotations

import array
import dataclasses
import hashlib
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """Prompt positions [offset, offset + length) hold one image's embeddings; `digest` is the sha256
    of the image's encoded bytes."""

    offset: int
    length: int
    digest: bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


def hash_block_tokens(parent_hash: int | None, tokens: Sequence[int], extra: bytes = b"") -> int:
    """Hash of one full block, chained to its parent: equal only for equal prefixes. `extra`: the
    digests of the images the block overlaps (`span_digests`)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((parent_hash or 0).to_bytes(8, "little"))
    digest.update(array.array("q", tokens).tobytes())
    digest.update(extra)
    return int.from_bytes(digest.digest(), "little")


def salted_root(salt: bytes) -> int | None:
    """The parent hash of a chain's first block for a deployment's salt (None: unsalted)."""
    if not salt:
        return None
    return int.from_bytes(hashlib.blake2b(salt, digest_size=8, person=b"triphase-prefix").digest(), "little")


def span_digests(images: Sequence[ImageSpan], start: int, end: int) -> bytes:
    """The digests of the images overlapping positions [start, end), in prompt order."""
    return b"".join(image.digest for image in images if image.offset < end and start < image.end)


def prompt_block_hashes(token_ids: Sequence[int], block_size: int,
                        images: Sequence[ImageSpan] = (), root: int | None = None) -> list[int]:
    """Chained hashes of every full block of a prompt; `root`: `salted_root` of the deployment's salt."""
    hashes: list[int] = []
    parent: int | None = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        end = start + block_size
        parent = hash_block_tokens(parent, token_ids[start:end], span_digests(images, start, end))
        hashes.append(parent)
    return hashes
