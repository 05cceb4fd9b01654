"""Images in chat messages become runs of placeholder token ids, never text a client could forge."""

from __future__ import annotations

import pytest

from triphase.common.models.files import load_tokenizer
from triphase.common.models.tokenizer import ImageSlot

SLOT = ImageSlot(token_id=7, count=4)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)[0]  # the bundled SmolLM2's tokenizer and chat template


def test_text_only_messages_encode_as_encode_chat_does(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_start|>there"}]
    assert tokenizer.encode_chat_with_images(messages) == (tokenizer.encode_chat(messages), [])


def test_images_go_where_the_parts_are(tokenizer):
    ids, offsets = tokenizer.encode_chat_with_images([
        {"role": "user", "content": ["Look:", SLOT, "and", SLOT, SLOT]},
    ])
    assert len(offsets) == 3
    for at in offsets:
        assert ids[at : at + 4] == [7] * 4
    assert offsets[2] == offsets[1] + 4  # two images in a row
    between = tokenizer.decode(ids[offsets[0] + 4 : offsets[1]])
    assert between == "and"
    assert tokenizer.decode(ids[: offsets[0]]).endswith("Look:")
    assert ids.count(7) == 12  # the text holds no placeholder token of its own


def test_placeholder_text_typed_by_a_client_stays_text(tokenizer):
    forged = tokenizer.id_to_token(7)
    ids, offsets = tokenizer.encode_chat_with_images([{"role": "user", "content": [f"{forged}{forged}"]}])
    assert offsets == [] and 7 not in ids
