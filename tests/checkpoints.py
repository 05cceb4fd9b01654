"""Pieces of the tiny Hugging Face checkpoints the model tests write (and load with transformers and
with triphase)."""

from __future__ import annotations

import json
import pathlib


def write_word_tokenizer(folder: pathlib.Path, vocab: int) -> None:
    """A word-level tokenizer over "w0".."w{vocab-1}" (w1 is BOS, w2 EOS; no BOS added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2",
                                                              "add_bos_token": False}))
