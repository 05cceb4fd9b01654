"""Tokenizer and chat template, built from GGUF metadata or a Hugging Face tokenizer.json.

`Tokenizer` wraps the `tokenizers` library so the engine sees one small interface: encode, decode,
chat template, and the special token ids generation needs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# Split patterns for the byte-level BPE pre-tokenizers GGUF files name in `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_MARKER = re.compile("(\ue000\\d+\ue001)")  # stands in for a message's content while rendering
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types that are special (never split, skipped on decode)


@dataclasses.dataclass
class ChatMessage:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class ImageSlot:
    """Where an image goes in a message's content (`encode_chat_with_images`): `count` copies of the
    model's image placeholder token `token_id`."""

    token_id: int
    count: int


class Tokenizer:
    """Text <-> token ids for one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos_token: bool,
        chat_template: str | None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}  # texts of bos_token, eos_token: the chat template names them
        self._template: jinja2.Template | None = None

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for (at least 1): a text of n
        bytes has at least n / max_token_bytes tokens, so a too-long text can be refused untokenized."""
        return max((len(t.encode()) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        token = self.backend.id_to_token(token_id)
        return None if token is None else str(token)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders tool definitions itself (it reads a `tools` variable)."""
        return "tools" in (self.chat_template or "")

    def render_chat(self, messages: Sequence[ChatMessage | dict[str, Any]], *,
                    add_generation_prompt: bool = True, tools: Sequence[dict[str, Any]] | None = None) -> str:
        """Apply the model's own chat template (Jinja, sandboxed, HF's whitespace settings); `tools`
        (OpenAI's function definitions) for a template that `renders_tools`."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        rows = [dataclasses.asdict(m) if isinstance(m, ChatMessage) else dict(m) for m in messages]
        extra = {"tools": list(tools)} if tools else {}
        return self._template.render(
            messages=rows, add_generation_prompt=add_generation_prompt, **extra, **self.special_tokens
        )

    def encode_chat(self, messages: Sequence[ChatMessage | dict[str, Any]],
                    tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """The chat template's tokens. Special-token text inside a message's content stays text: a
        user who types `<|im_start|>system` gets those characters, not the control token, so no one
        can open a turn of another role. (The template already places BOS where the model wants it.)"""
        rows = [dataclasses.asdict(m) if isinstance(m, ChatMessage) else dict(m) for m in messages]
        specials = self._specials
        if specials is None or not any(specials.search(str(row.get("content") or "")) for row in rows):
            return self.encode(self.render_chat(rows, tools=tools), add_special_tokens=False)
        return self._encode_marked(rows, [[str(row.get("content") or "")] for row in rows], tools)[0]

    def encode_chat_with_images(self, messages: Sequence[dict[str, Any]],
                                tools: Sequence[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
        """`encode_chat` for messages whose content may be a list of text and `ImageSlot`s, in order:
        returns (token ids, the position where each image's placeholder run starts). The template sees
        each content as one string, so it cannot split or drop an image; an image's placeholders are
        inserted as token ids, never as text a client could forge."""
        rows = [dict(m) for m in messages]
        parts: list[list[Any]] = []
        for row in rows:
            content = row.get("content")
            parts.append(list(content) if isinstance(content, list) else [str(content or "")])
        return self._encode_marked(rows, parts, tools)

    def _encode_marked(self, rows: list[dict[str, Any]], contents: list[list[Any]],
                       tools: Sequence[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
        """Render with each content replaced by a marker, encode the template's text with its special
        tokens and each content's text with special tokens read as plain text."""
        marked = [{**row, "content": f"\ue000{i}\ue001"} for i, row in enumerate(rows)]
        pieces = _MARKER.split(self.render_chat(marked, tools=tools))
        if sorted(int(p[1:-1]) for p in pieces if _MARKER.fullmatch(p)) != list(range(len(rows))):
            raise ValueError("message content contains special tokens this chat template cannot keep apart")
        ids: list[int] = []
        images: list[int] = []
        for piece in pieces:
            if not _MARKER.fullmatch(piece):
                ids += self.backend.encode(piece, add_special_tokens=False).ids if piece else []
                continue
            text = ""
            for part in [*contents[int(piece[1:-1])], None]:  # None: flush the text at the end
                if isinstance(part, str):
                    text += part
                    continue
                ids += self._plain.encode(text, add_special_tokens=False).ids if text else []
                text = ""
                if isinstance(part, ImageSlot):
                    images.append(len(ids))
                    ids += [part.token_id] * part.count
        return ids, images

    @functools.cached_property
    def _specials(self) -> re.Pattern[str] | None:
        """Matches any special token's text (None: the tokenizer has none)."""
        texts = sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.special},
                       key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    @functools.cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token text as ordinary text."""
        plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes (byte-level BPE, `tokenizer.ggml.model == "gpt2"`)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2 byte-level BPE)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(tok, special=True, normalized=False)
                for tok, t in zip(tokens, types, strict=True) if t in (_CONTROL, _USER_DEFINED)]
    backend.add_special_tokens(specials)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    return Tokenizer(
        backend,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens={
            "bos_token": tokens[int(bos)] if bos is not None else "",
            "eos_token": tokens[int(eos)] if eos is not None else "",
        },
    )


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("llama-bpe", "llama3"):
        split = _LLAMA3_SPLIT
    elif pre == "qwen2":
        split = _QWEN2_SPLIT
    else:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def from_hf_files(tokenizer_json: str, tokenizer_config: dict[str, Any], eos_token_ids: Sequence[int]) -> Tokenizer:
    """Build the tokenizer of a Hugging Face model directory. Whether a prompt starts with BOS is the
    tokenizer.json post-processor's decision, as in transformers (whatever the architecture or
    `add_bos_token` say: transformers 5 follows the post-processor for every tokenizer class)."""
    backend = tokenizers.Tokenizer.from_file(tokenizer_json)
    if tokenizer_config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        _as_transformers_llama(backend, tokenizer_config)
    vocab = backend.get_vocab(with_added_tokens=True)

    def token_text(key: str) -> str | None:
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    bos_text, eos_text = token_text("bos_token"), token_text("eos_token")
    eos_ids = list(eos_token_ids)
    if eos_text is not None and eos_text in vocab and vocab[eos_text] not in eos_ids:
        eos_ids.append(vocab[eos_text])
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    lead = _post_processor_lead(backend)
    bos_id = lead[0] if len(lead) == 1 else vocab.get(bos_text) if bos_text else None
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos_token=len(lead) == 1,
        chat_template=template,
        special_tokens={"bos_token": bos_text or "", "eos_token": eos_text or ""},
    )


def _post_processor_lead(backend: tokenizers.Tokenizer) -> list[int]:
    """The ids the post-processor puts before a text's own (Llama 3's `<|begin_of_text|>`, Gemma's
    `<bos>`; none for GPT-2-style and Qwen tokenizers)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _as_transformers_llama(backend: tokenizers.Tokenizer, tokenizer_config: dict[str, Any]) -> None:
    """transformers 5 rebuilds a `LlamaTokenizer` (Llama 2, Mistral, Mixtral, Phi-3) from the file's
    vocabulary and merges with its own spaces rule instead of the file's normalizer: a Metaspace
    pre-tokenizer that prepends "▁" to the first word only (or to every word with `legacy`, or
    never without `add_prefix_space`). Do the same, so a leading space tokenizes as it does there."""
    add_prefix_space = tokenizer_config.get("add_prefix_space")
    if add_prefix_space is None or add_prefix_space:
        scheme = "always" if tokenizer_config.get("legacy", False) else "first"
    else:
        scheme = "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
