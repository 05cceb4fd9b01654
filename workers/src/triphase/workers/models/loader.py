"""Turn a model path into (config, float weights, tokenizer).

Two formats: a GGUF file (dequantized with the `gguf` package) and a Hugging Face directory
(config.json + *.safetensors + tokenizer.json). Weights come out with Hugging Face names and
layouts whatever the source, so model code has one naming scheme. Every failure a user can cause
(missing file, unsupported architecture, corrupted file) is raised as `UserError` with one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import torch

from triphase.common.errors import UserError
from triphase.common.models import tokenizer as tok
from triphase.common.models.files import gguf_metadata, gguf_reader, is_gguf, resolve
from triphase.common.models.vision import VisionConfig, vision_config_from_hf
from triphase.workers.models import families
from triphase.workers.models.config import ModelConfig, MoeConfig, RopeScaling
from triphase.workers.models.image_processing import ImageProcessor
from triphase.workers.models.quant import Q4_0, Q4_1, Q4Blocks, parse_gguf_q4

logger = logging.getLogger(__name__)

# general.architecture in a GGUF file -> the family name ModelConfig.architecture carries
GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
GGUF_ARCHITECTURES = tuple(GGUF_FAMILIES)
T = TypeVar("T")
Progress = Callable[[Iterable[T], int, str], Iterable[T]]


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: tok.Tokenizer
    path: str
    # 4-bit GGUF matrices kept packed (HF names), when asked for with keep_quantized=True
    quantized: dict[str, Q4Blocks] = dataclasses.field(default_factory=dict)
    # a LLaVA-style model's vision side (its weights are in `weights` as vision.* and projector.*)
    vision: VisionConfig | None = None
    image_processor: ImageProcessor | None = None


def _unsupported(arch: str, path: str, supported: Iterable[str]) -> UserError:
    return UserError(f"unsupported architecture {arch!r} in {path} (supported: {', '.join(supported)})")


def _no_progress(items: Iterable[T], total: int, desc: str) -> Iterable[T]:
    return items


def load_model(path: str | None = None, *, dtype: torch.dtype = torch.float32,
               progress: Progress[Any] = _no_progress, keep_quantized: bool = False) -> LoadedModel:
    """Load a GGUF file or HF directory (`None`: the bundled model). With `keep_quantized`, Q4_0/Q4_1
    matrices of a GGUF file are also returned unpacked (see quant.py) beside their dense copies."""
    path = resolve(path)
    if os.path.isdir(path):
        return _load_hf_dir(path, dtype, progress, keep_quantized)
    if not is_gguf(path):
        raise UserError(f"{path} is neither a GGUF file nor a Hugging Face model directory")
    return _load_gguf(path, dtype, progress, keep_quantized)


# ---------------------------------------------------------------------------------------- GGUF
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
# llama.cpp stacks a sparse layer's experts into one [experts, rows, cols] tensor per matrix
_GGUF_EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                      "ffn_down_exps.weight": "down_proj"}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _load_gguf(path: str, dtype: torch.dtype, progress: Progress[Any], keep_quantized: bool) -> LoadedModel:
    import gguf

    reader = gguf_reader(path)
    meta = gguf_metadata(reader, path)
    arch = str(meta.get("general.architecture", "?"))
    if arch not in GGUF_ARCHITECTURES:
        raise _unsupported(arch, path, GGUF_ARCHITECTURES)
    try:
        config = _gguf_config(meta, arch, path)
        tokenizer = tok.from_gguf_metadata(meta)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: incomplete metadata ({exc})") from None

    weights: dict[str, torch.Tensor] = {}
    quantized: dict[str, Q4Blocks] = {}
    for tensor in progress(reader.tensors, len(reader.tensors), "loading weights"):
        name = _gguf_to_hf_name(tensor.name)
        if name is None:
            continue
        heads = _rope_heads(arch, name, config)
        kind = tensor.tensor_type.name
        if keep_quantized and kind in (Q4_0, Q4_1) and name.endswith("_proj.weight") and len(tensor.shape) == 2:
            blocks = parse_gguf_q4(tensor.data, kind, int(tensor.shape[1]), int(tensor.shape[0]))
            if heads:
                blocks = blocks.permute_rows(_unpermute_rope_rows(np.arange(blocks.shape[0]), heads))
            quantized[name] = blocks
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise UserError(f"{path}: cannot dequantize {tensor.name} ({exc})") from None
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = np.array(array, dtype=np.float32, copy=True).reshape(shape)
        if heads:
            array = _unpermute_rope_rows(array, heads)
        if "{expert}" in name:  # one tensor per expert, as Hugging Face names them
            for expert, matrix in enumerate(array):
                weights[name.format(expert=expert)] = torch.from_numpy(matrix).to(dtype)
            continue
        weights[name] = torch.from_numpy(array).to(dtype)
    config = _check_complete(weights, config, path)
    return LoadedModel(config, weights, tokenizer, path, quantized)


def _rope_heads(arch: str, name: str, config: ModelConfig) -> int:
    """Heads whose rows llama.cpp permuted in this tensor (0: not permuted)."""
    if arch != "llama":
        return 0
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_key_value_heads
    return 0


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{index}.{_GGUF_LAYER_NAMES[rest]}"
        if rest in _GGUF_EXPERT_NAMES:
            return f"model.layers.{index}.mlp.experts.{{expert}}.{_GGUF_EXPERT_NAMES[rest]}.weight"
    return None  # e.g. rope_freqs: recomputed from the config


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion permutation of Q/K rows (interleaved -> half-split rotary pairs)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(meta: dict[str, Any], arch: str, path: str) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise KeyError(f"{arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    layers = int(get("block_count"))
    moe = None
    if meta.get(f"{arch}.expert_count"):  # llama.cpp's qwen3moe always renormalises the top-k weights
        moe = MoeConfig(num_experts=int(get("expert_count")), top_k=int(get("expert_used_count")),
                        intermediate_size=int(get("expert_feed_forward_length")), normalize_top_k=True,
                        layers=tuple(range(layers)))
    return ModelConfig(
        architecture=GGUF_FAMILIES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta.get(f"{arch}.feed_forward_length") or get("expert_feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings=True,  # corrected in _check_complete when output.weight exists
        attention_bias=arch == "qwen2",
        rope_scaling=scaling,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=str(meta.get("general.name") or os.path.basename(path)),
        qk_norm=arch in ("qwen3", "qwen3moe"),
        moe=moe,
    )


# ----------------------------------------------------------------------------------- HF folder
def _load_hf_dir(path: str, dtype: torch.dtype, progress: Progress[Any], keep_quantized: bool = False) -> LoadedModel:
    from safetensors import safe_open

    folder = pathlib.Path(path)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{path} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}/config.json is not valid JSON ({exc})") from None
    if raw.get("model_type") == "llava" and "triphase_text_model" in raw:
        return _load_with_text_model(folder, raw, dtype, progress, keep_quantized)
    vision = None
    if raw.get("model_type") == "llava":
        try:
            vision = vision_config_from_hf(raw)
            text = raw["text_config"]
            raw = {**text, "eos_token_id": text.get("eos_token_id", raw.get("eos_token_id"))}
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}/config.json: unsupported or invalid LLaVA vision settings ({exc})") from None
    if raw.get("model_type") == "gemma3":  # the multimodal checkpoint: its language model is served
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise UserError(f"{path}/config.json: a gemma3 config needs a text_config object")
        logger.info("Serving the text model of %s (Gemma 3's vision tower is not supported)", path)
        raw = {"model_type": "gemma3_text", **text, "eos_token_id": text.get("eos_token_id", raw.get("eos_token_id"))}
    model_type = str(raw.get("model_type", "?"))
    if model_type not in families.HF_ARCHITECTURES:
        raise _unsupported(model_type, path, families.HF_ARCHITECTURES)
    config = _hf_config(raw, model_type, path, folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors files")
    if not (folder / "tokenizer.json").exists():
        raise UserError(f"{path} has no tokenizer.json")
    tok_config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").exists():
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = tok.from_hf_files(str(folder / "tokenizer.json"), tok_config, config.eos_token_ids)

    weights: dict[str, torch.Tensor] = {}
    for file in progress(files, len(files), "loading weights"):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    weights[families.hf_tensor_name(_hf_name(key))] = handle.get_tensor(key).to(dtype)
        except Exception as exc:  # safetensors raises its own SafetensorError family
            raise UserError(f"{file} is a corrupted safetensors file ({exc})") from None
    try:
        families.split_fused(weights, config)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    config = _check_complete(weights, config, path)
    if vision is None:
        return LoadedModel(config, weights, tokenizer, path)
    missing = [n for n in ("vision.embeddings.patch_embedding.weight", "projector.linear_1.weight") if n not in weights]
    if missing:
        raise UserError(f"{path}: missing tensor {missing[0]}")
    return LoadedModel(config, weights, tokenizer, path, vision=vision,
                       image_processor=ImageProcessor.from_dir(folder, vision.image_size, vision.kind))


def _load_with_text_model(folder: pathlib.Path, raw: dict[str, Any], dtype: torch.dtype,
                          progress: Progress[Any], keep_quantized: bool) -> LoadedModel:
    """A LLaVA-style directory whose language model is another file (`triphase_text_model`: a path, or
    "bundled"; loaded as that file would be, int4 blocks kept when asked): the vision tower and
    projector come from the directory's safetensors."""
    from safetensors import safe_open

    text = raw["triphase_text_model"]
    loaded = load_model(None if text == "bundled" else str(folder / text), dtype=dtype, progress=progress,
                        keep_quantized=keep_quantized)
    try:
        vision = vision_config_from_hf(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{folder}/config.json: unsupported or invalid vision settings ({exc})") from None
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    loaded.weights[_hf_name(key)] = handle.get_tensor(key).to(dtype)
        except Exception as exc:  # safetensors raises its own SafetensorError family
            raise UserError(f"{file} is a corrupted safetensors file ({exc})") from None
    if "projector.linear_1.weight" not in loaded.weights:
        raise UserError(f"{folder}: missing tensor projector.linear_1.weight")
    loaded.vision = vision
    loaded.image_processor = ImageProcessor.from_dir(folder, vision.image_size, vision.kind)
    loaded.path = str(folder)
    loaded.config = dataclasses.replace(loaded.config, name=folder.name)
    return loaded


# Where LLaVA checkpoints keep their parts, by transformers version, and the names model code reads.
_HF_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)


def _hf_name(key: str) -> str:
    for prefix, ours in _HF_PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return key


def _hf_config(raw: dict[str, Any], model_type: str, path: str, folder: pathlib.Path) -> ModelConfig:
    try:
        eos = raw.get("eos_token_id")
        gen_path = folder / "generation_config.json"
        if gen_path.exists():
            eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        return families.hf_config(raw, model_type, folder.name, eos_ids)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}/config.json: missing, invalid or unsupported field ({exc})") from None


def _check_complete(weights: dict[str, torch.Tensor], config: ModelConfig, path: str) -> ModelConfig:
    """Fail with one line naming the first missing tensor; returns the config with tied embeddings
    settled by what the file holds (an output matrix means untied)."""
    if "lm_head.weight" in weights:
        config = dataclasses.replace(config, tie_word_embeddings=False)
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_hidden_layers):
        required += families.layer_tensors(config, i)
    missing = [name for name in required if name not in weights]
    if missing:
        raise UserError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing)")
    return config
