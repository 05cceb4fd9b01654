"""Client API keys (router/api_keys.py): parsing, checking, rotation."""

from __future__ import annotations

import pytest

from triphase.common.errors import UserError
from triphase.router.api_keys import ApiKeys, parse
from triphase.router.errors import Unauthorized

ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef"


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nalice {ALICE}\n\n{BOB}  # no name\n")
    return ApiKeys(path, reload_s=0)


def test_a_right_key_is_counted_under_its_name_never_itself(keys):
    assert keys.check(f"Bearer {ALICE}") == "alice"
    name = keys.check(f"bearer {BOB}")
    assert name.startswith("key-") and BOB not in name and len(name) == 12


@pytest.mark.parametrize(("header", "message"), [
    (None, "needs a key"),
    ("", "needs a key"),
    (ALICE, "Bearer"),  # no scheme
    (f"Basic {ALICE}", "Bearer"),
    ("Bearer ", "Bearer"),
    ("Bearer " + "x" * 10_000, "Bearer"),  # refused before it is hashed
    (f"Bearer {ALICE}x", "incorrect"),
    (f"Bearer {ALICE[:-1]}", "incorrect"),
])
def test_a_missing_or_wrong_key_is_unauthorized(keys, header, message):
    with pytest.raises(Unauthorized, match=message) as refused:
        keys.check(header)
    assert refused.value.status == 401 and refused.value.body()["error"]["code"] == "invalid_api_key"


def test_keys_are_added_and_revoked_without_a_restart(keys):
    keys.path.write_text(f"carol sk-carol-0123456789abcdef\nalice {ALICE}\n")
    assert keys.check("Bearer sk-carol-0123456789abcdef") == "carol"
    with pytest.raises(Unauthorized):
        keys.check(f"Bearer {BOB}")


@pytest.mark.parametrize("content", ["", "# all commented out\n", "alice short\n"])
def test_a_file_that_turns_empty_or_bad_keeps_the_keys_in_force(keys, content):
    keys.path.write_text(content)
    assert keys.check(f"Bearer {ALICE}") == "alice"


@pytest.mark.parametrize(("text", "message"), [
    ("alice bob carol\n", "line 1: expected"),
    ("ok-key-0123456789abcdef\n-bad sk-0123456789abcdefgh\n", "line 2: expected"),
    ("short\n", "line 1: a key is 16 to 512"),
])
def test_a_bad_key_file_names_its_line(text, message):
    with pytest.raises(UserError, match=message):
        parse(text)


def test_a_key_file_without_keys_is_refused_at_start(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no API key"):
        ApiKeys(path)
    with pytest.raises(UserError, match="cannot read"):
        ApiKeys(tmp_path / "missing")
