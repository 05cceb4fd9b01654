"""Signing and checking a worker's tickets (common/security/tickets.py) on the protobuf messages that carry them.

With a ticket key (the deployment's, from the mTLS bundle) a prefill worker signs the KvTransferParams
of every prefill, valid while it keeps the KV pinned, and an encode worker signs where it keeps an
image's embeddings, valid for the slot's lease; every worker then refuses to act on such a message
unless its ticket holds (`TicketRefused`: PERMISSION_DENIED). Without a key nothing is signed and
nothing is checked (a plaintext stack on one machine).
"""

from __future__ import annotations

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.security import tickets
from triphase.common.security.tickets import TicketRefused

KV, IMAGE = "kv", "image"

__all__ = ["Signer", "TicketRefused"]


def kv_fields(kv: pb.KvTransferParams) -> list[tickets.Field]:
    return [kv.request_id, kv.source_worker, kv.source_endpoint, tickets.digest(kv.nixl_agent_metadata),
            kv.nixl_agent_name, kv.kv_base_address, list(kv.block_ids),
            kv.layout.SerializeToString(deterministic=True), kv.num_tokens, kv.first_token_id, kv.kv_memory,
            kv.kv_device_id]


def image_fields(digest: bytes, endpoint: str, slot: pb.EmbeddingsSlot | None) -> list[tickets.Field]:
    if slot is None:
        return [digest, endpoint]
    return [digest, endpoint, tickets.digest(slot.nixl_agent_metadata), slot.address, slot.nbytes]


class Signer:
    def __init__(self, key: bytes | None) -> None:
        self.key = key

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def _ticket(self, kind: str, fields: list[tickets.Field], ttl_s: float) -> pb.Ticket:
        assert self.key is not None
        expires = tickets.now_ms() + int(ttl_s * 1000)
        return pb.Ticket(expires_unix_ms=expires, mac=tickets.sign(self.key, kind, fields, expires))

    def sign_kv(self, kv: pb.KvTransferParams, ttl_s: float) -> None:
        if self.key is not None:
            kv.ticket.CopyFrom(self._ticket(KV, kv_fields(kv), ttl_s))

    def check_kv(self, kv: pb.KvTransferParams, *, request_id: str | None = None,
                 source_endpoint: str | None = None) -> None:
        """TicketRefused unless `kv` is as its prefill worker signed it (and, when given, for this request
        id and from this endpoint: the source checks that it signed it itself)."""
        if self.key is None:
            return
        tickets.check(self.key, KV, kv_fields(kv), kv.ticket.expires_unix_ms, kv.ticket.mac)
        if request_id is not None and kv.request_id != request_id:
            raise TicketRefused(f"the KV ticket is for request {kv.request_id!r}, not {request_id!r}")
        if source_endpoint is not None and kv.source_endpoint != source_endpoint:
            raise TicketRefused("the KV ticket names another worker")

    def sign_image(self, response: pb.EncodeResponse, ttl_s: float) -> None:
        if self.key is not None:
            slot = response.slot if response.HasField("slot") else None
            response.ticket.CopyFrom(self._ticket(IMAGE, image_fields(response.digest, response.endpoint, slot),
                                                  ttl_s))

    def check_image(self, image: pb.PromptImage) -> None:
        """TicketRefused unless the image's source endpoint and slot are as an encode worker signed them."""
        if self.key is None:
            return
        slot = image.slot if image.HasField("slot") else None
        tickets.check(self.key, IMAGE, image_fields(image.digest, image.source_endpoint, slot),
                      image.ticket.expires_unix_ms, image.ticket.mac)
