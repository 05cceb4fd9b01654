"""The CRD's model.tokenizer and model.format as the router and the workers honour them."""

from __future__ import annotations

import json

import pytest
import tokenizers

from triphase.common.errors import UserError
from triphase.common.models.files import bundled_model_path, check_format, load_tokenizer

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def own():
    return load_tokenizer(None)[0]


def _word_level(path, words):
    """A tiny tokenizer.json that splits on spaces into `words` (id = index)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.save(str(path))


def test_a_tokenizer_directory_replaces_the_models_own(tmp_path, own):
    _word_level(tmp_path / "tokenizer.json", ["<unk>", "[user]", "hello", "world", "</s>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>"}))
    tokenizer, name = load_tokenizer(None, str(tmp_path))
    assert tokenizer.encode("hello world") == [2, 3]
    assert tokenizer.encode_chat([{"role": "user", "content": "hello"}]) == [1, 2]
    assert 4 in tokenizer.eos_token_ids  # its own end-of-sequence token joins the model's
    assert set(own.eos_token_ids) <= set(tokenizer.eos_token_ids)
    assert name == load_tokenizer(None)[1]  # the model's name is unchanged


def test_a_bare_tokenizer_json_keeps_the_models_chat_template(tmp_path, own):
    _word_level(tmp_path / "tok.json", ["<unk>", "hello"])
    tokenizer, _ = load_tokenizer(None, str(tmp_path / "tok.json"))
    assert tokenizer.chat_template == own.chat_template
    assert tokenizer.encode("hello hello") == [1, 1]


def test_a_gguf_files_tokenizer_can_be_given(own):
    tokenizer, _ = load_tokenizer(None, bundled_model_path())
    assert tokenizer.encode("Hello there") == own.encode("Hello there")


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, r"tokenizer not found: .*missing"),
    (lambda d: (d / "missing").mkdir(), r"missing has no tokenizer.json"),
    (lambda d: (d / "missing").write_text("{not json"), r"missing is not a tokenizer.json"),
])
def test_a_bad_tokenizer_path_fails_in_one_line(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        load_tokenizer(None, str(tmp_path / "missing"))


def test_a_tokenizer_with_tokens_the_model_cannot_embed_is_refused(tmp_path, own):
    _word_level(tmp_path / "tokenizer.json", [f"w{i}" for i in range(own.vocab_size + 1)])
    with pytest.raises(UserError, match=rf"has {own.vocab_size + 1} tokens; the model has {own.vocab_size}"):
        load_tokenizer(None, str(tmp_path))


def test_the_format_is_checked_against_the_files(tmp_path):
    check_format(None, None)
    check_format(None, "gguf")  # the bundled model is a GGUF file
    with pytest.raises(UserError, match=r"the model format is safetensors, but .*\.gguf is not a directory"):
        check_format(None, "safetensors")
    with pytest.raises(UserError, match=r"the model format is gguf, but .* is a directory"):
        check_format(str(tmp_path), "gguf")
    with pytest.raises(UserError, match=r"is not a directory of \*\.safetensors files"):
        check_format(str(tmp_path), "safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_format(str(tmp_path), "safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="is not a GGUF file"):
        check_format(str(tmp_path / "notes.txt"), "gguf")
