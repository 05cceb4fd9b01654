"""The chained block hash shared by the engine's prefix cache and the router's cache-aware placement.

Process-independent (blake2b, not Python's salted hash) so a router can compute the hashes of a
prompt's blocks and compare them with the hashes a worker reports."""

from __future__ import annotations

import array
import hashlib
from collections.abc import Sequence


def hash_block_tokens(parent_hash: int | None, tokens: Sequence[int]) -> int:
    """Hash of one full block, chained to its parent: equal only for equal prefixes."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((parent_hash or 0).to_bytes(8, "little"))
    digest.update(array.array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of a prompt."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
