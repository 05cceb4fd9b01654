"""A Hugging Face directory's tokenizer against transformers (AutoTokenizer on the same files), for the
tokenizer style of each family the engine serves: byte-level BPE without BOS (SmolLM2 and GPT-2 style,
Qwen), byte-level BPE whose post-processor adds BOS (Llama 3), SentencePiece-converted BPE loaded as
transformers' LlamaTokenizer (Llama 2, Mistral, Mixtral, Phi-3) in each of its spaces modes, and Gemma's.

BOS follows the tokenizer.json post-processor whatever the architecture (a Llama-architecture model
with a GPT-2-style tokenizer, SmolLM2's own directory for one, gets none), as transformers does."""

from __future__ import annotations

import json

import pytest

from triphase.common.models.tokenizer import from_hf_files

CORPUS = ["Hello world, this is a small corpus.", "The quick brown fox jumps over the lazy dog!",
          "naïve café über 東京 123 4567", "  leading spaces and\ttabs\nnewlines"] * 40
TEXTS = ["Hello world", " leading space", "   three spaces", "naïve café 東京", "a\nb\tc  d", "", "The fox."]
STYLES = {  # style: (tokenizer_class, BOS text added by the post-processor or None, extra tokenizer_config)
    "smollm": ("GPT2Tokenizer", None, {}),
    "qwen": ("Qwen2Tokenizer", None, {}),
    "llama3": ("PreTrainedTokenizerFast", "<|begin_of_text|>", {}),
    "llama2": ("LlamaTokenizer", "<s>", {"add_bos_token": True}),
    "llama2-legacy": ("LlamaTokenizer", "<s>", {"legacy": True}),
    "llama2-no-prefix": ("LlamaTokenizer", "<s>", {"add_prefix_space": False}),
    "phi3": ("LlamaTokenizer", "<s>", {"add_bos_token": False}),  # transformers 5 still follows the file
    "gemma": ("GemmaTokenizer", "<bos>", {}),
}


def write_tokenizer(style, folder):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    cls, bos, extra = STYLES[style]
    sentencepiece = cls in ("LlamaTokenizer", "GemmaTokenizer")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if cls == "GemmaTokenizer" else ["<unk>", "<s>", "</s>"]
    if sentencepiece:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        replace = normalizers.Replace(" ", "\u2581")
        tok.normalizer = replace if cls == "GemmaTokenizer" else normalizers.Sequence(
            [normalizers.Prepend("\u2581"), replace])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        alphabet = []
    else:
        specials = ["<|endoftext|>", "<|begin_of_text|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if style == "qwen":
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=alphabet))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": cls, "bos_token": bos or specials[0], "eos_token": specials[-1], **extra}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("style", list(STYLES))
def test_tokenization_matches_transformers(style, tmp_path):
    import transformers

    config = write_tokenizer(style, tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = from_hf_files(str(tmp_path / "tokenizer.json"), config, [])
    assert ours.add_bos_token == (STYLES[style][1] is not None)
    for text in TEXTS:
        assert ours.encode(text) == reference(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", ["smollm", "llama3"])
def test_a_llama_architecture_directory_follows_its_tokenizer_not_its_architecture(style, tmp_path):
    """SmolLM2's own directory is a Llama-architecture model with a GPT-2-style tokenizer: no BOS, as in
    transformers; a Llama 3 one gets its BOS from the post-processor. The router and the worker agree."""
    import transformers

    from triphase.common.models.files import load_tokenizer

    write_tokenizer(style, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 0}))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tokenizer, _ = load_tokenizer(str(tmp_path))
    assert tokenizer.encode("Hello world") == reference("Hello world")["input_ids"]
    assert tokenizer.add_bos_token == (style == "llama3")
