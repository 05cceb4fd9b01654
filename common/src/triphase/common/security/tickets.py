"""Tickets: what a worker signs so that another worker of its deployment may read from it.

A prefill worker signs the KV it pins (request id, its own endpoint, block ids, token count, layout, its
NIXL agent and KV base address) with the deployment's ticket key, valid for the pin's lifetime; an
encode worker signs where it keeps an image's embeddings. The router passes tickets on unchanged. The
reading worker checks a ticket before it connects anywhere or reads a byte, so a caller cannot point it
at an address outside the deployment or at blocks nobody pinned for that request; the source checks it
again before its ReadKv stream or ReleaseKv. HMAC-SHA256 over a length-prefixed encoding of the fields
(no two field lists encode alike), compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Sequence

Field = bytes | str | int | Sequence[int]


class TicketRefused(Exception):
    """A ticket is missing, forged, for other data, or expired."""


def _encode(fields: Sequence[Field]) -> bytes:
    out = bytearray()
    for value in fields:
        if isinstance(value, str):
            raw, tag = value.encode(), b"s"
        elif isinstance(value, bytes):
            raw, tag = value, b"b"
        elif isinstance(value, int):
            raw, tag = value.to_bytes(16, "big", signed=True), b"i"
        else:
            raw, tag = b"".join(int(v).to_bytes(8, "big") for v in value), b"l"
        out += tag + struct.pack(">Q", len(raw)) + raw
    return bytes(out)


def now_ms() -> int:
    return int(time.time() * 1000)


def sign(key: bytes, kind: str, fields: Sequence[Field], expires_ms: int) -> bytes:
    """The ticket's MAC; `kind` keeps a KV ticket from passing for an embeddings ticket."""
    return hmac.new(key, _encode([kind, expires_ms, *fields]), hashlib.sha256).digest()


def check(key: bytes, kind: str, fields: Sequence[Field], expires_ms: int, mac: bytes,
          *, now: int | None = None) -> None:
    """Raise TicketRefused unless `mac` signs exactly these fields and has not expired."""
    if not mac:
        raise TicketRefused(f"{kind} ticket missing")
    if not hmac.compare_digest(sign(key, kind, fields, expires_ms), mac):
        raise TicketRefused(f"{kind} ticket does not match (forged, or for other data)")
    if (now if now is not None else now_ms()) > expires_ms:
        raise TicketRefused(f"{kind} ticket expired")


def digest(data: bytes) -> bytes:
    """A short stand-in for a large field (NIXL agent metadata) inside the signed fields."""
    return hashlib.sha256(data).digest()
