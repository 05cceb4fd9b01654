"""KV and embedding tickets (common/security/tickets.py; workers/signing.py puts them on the messages)."""

from __future__ import annotations

import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.security import tickets
from triphase.common.security.tickets import TicketRefused
from triphase.workers.signing import Signer

KEY = b"k" * 32
FIELDS = ["req-1", "10.0.0.7:50051", [3, 4, 5], 48]


def test_a_ticket_holds_for_exactly_the_fields_it_signed_until_it_expires():
    mac = tickets.sign(KEY, "kv", FIELDS, 2000)
    tickets.check(KEY, "kv", FIELDS, 2000, mac, now=1999)
    with pytest.raises(TicketRefused, match="expired"):
        tickets.check(KEY, "kv", FIELDS, 2000, mac, now=2001)


@pytest.mark.parametrize(("kind", "fields", "expires", "key"), [
    ("kv", ["req-2", *FIELDS[1:]], 2000, KEY),  # another request
    ("kv", [*FIELDS[:2], [3, 4, 6], 48], 2000, KEY),  # other blocks
    ("kv", ["req-1", "10.0.0.8:50051", *FIELDS[2:]], 2000, KEY),  # another endpoint
    ("kv", FIELDS, 9000, KEY),  # a later expiry
    ("image", FIELDS, 2000, KEY),  # passed off as another kind
    ("kv", FIELDS, 2000, b"x" * 32),  # checked with another deployment's key
])
def test_a_ticket_for_anything_else_is_refused(kind, fields, expires, key):
    mac = tickets.sign(KEY, "kv", FIELDS, 2000)
    with pytest.raises(TicketRefused, match="does not match"):
        tickets.check(key, kind, fields, expires, mac, now=1000)


def test_field_boundaries_are_part_of_what_is_signed():
    assert tickets.sign(KEY, "kv", ["ab", "c"], 1) != tickets.sign(KEY, "kv", ["a", "bc"], 1)
    assert tickets.sign(KEY, "kv", [[1, 2]], 1) != tickets.sign(KEY, "kv", [[1], [2]], 1)
    assert tickets.sign(KEY, "kv", ["1"], 1) != tickets.sign(KEY, "kv", [1], 1)


def test_a_missing_ticket_is_refused():
    with pytest.raises(TicketRefused, match="missing"):
        tickets.check(KEY, "kv", FIELDS, 2000, b"", now=1000)


def kv_params():
    return pb.KvTransferParams(request_id="r", source_worker="w", source_endpoint="10.0.0.7:50051",
                               nixl_agent_metadata=b"agent", kv_base_address=4096, block_ids=[1, 2],
                               layout=pb.KvLayout(num_layers=2, block_size=16), num_tokens=20, first_token_id=7)


def test_the_signer_covers_every_field_of_the_kv_transfer_parameters():
    signer = Signer(KEY)
    kv = kv_params()
    signer.sign_kv(kv, ttl_s=30)
    signer.check_kv(kv, request_id="r", source_endpoint="10.0.0.7:50051")
    for field, value in [("source_endpoint", "10.9.9.9:1"), ("nixl_agent_metadata", b"other"),
                         ("kv_base_address", 0), ("num_tokens", 21), ("first_token_id", 8), ("source_worker", "x")]:
        forged = pb.KvTransferParams()
        forged.CopyFrom(kv)
        setattr(forged, field, value)
        with pytest.raises(TicketRefused):
            signer.check_kv(forged)
    forged.CopyFrom(kv)
    forged.layout.block_size = 32
    with pytest.raises(TicketRefused):
        signer.check_kv(forged)
    with pytest.raises(TicketRefused, match="names another worker"):
        signer.check_kv(kv, source_endpoint="10.0.0.8:50051")
    with pytest.raises(TicketRefused, match="is for request"):
        signer.check_kv(kv, request_id="s")


def test_without_a_key_nothing_is_signed_or_checked():
    signer = Signer(None)
    kv = kv_params()
    signer.sign_kv(kv, ttl_s=30)
    assert not kv.HasField("ticket")
    signer.check_kv(kv)


def test_an_image_ticket_covers_its_source_and_slot():
    signer = Signer(KEY)
    response = pb.EncodeResponse(digest=b"d" * 32, endpoint="10.0.0.9:50051",
                                 slot=pb.EmbeddingsSlot(nixl_agent_metadata=b"a", address=64, nbytes=4096))
    signer.sign_image(response, ttl_s=30)
    image = pb.PromptImage(digest=response.digest, source_endpoint=response.endpoint, slot=response.slot,
                           ticket=response.ticket)
    signer.check_image(image)
    image.slot.address = 128
    with pytest.raises(TicketRefused):
        signer.check_image(image)
