"""TensorFlow.js as an oracle: the nsfwjs MobileNetV2 run by the library it was published for.

Installs @tensorflow/tfjs-core, -layers and -backend-cpu (pure JavaScript, pinned) from the npm
registry into the cache once, and runs them with node on a batch of pixels."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from triphase.local.gobuild import cache_root

TFJS_VERSION = "4.22.0"
PACKAGES = [f"@tensorflow/{name}@{TFJS_VERSION}" for name in ("tfjs-core", "tfjs-layers", "tfjs-backend-cpu")]
SCRIPT = """
const tf = require("@tensorflow/tfjs-core");
require("@tensorflow/tfjs-backend-cpu");
const layers = require("@tensorflow/tfjs-layers");
const fs = require("fs");
const [modelJs, shardJs, pixels, out, layer] = process.argv.slice(2);
const model = require(modelJs);
const shard = Buffer.from(require(shardJs), "base64");
(async () => {
  await tf.setBackend("cpu");
  const weights = shard.buffer.slice(shard.byteOffset, shard.byteOffset + shard.byteLength);
  const net = await layers.loadLayersModel(tf.io.fromMemory({modelTopology: model.modelTopology,
    weightSpecs: model.weightsManifest[0].weights, weightData: weights}));
  const features = layers.model({inputs: net.inputs, outputs: net.getLayer(layer).output});
  const raw = fs.readFileSync(pixels);
  const n = raw.length / 4 / (224 * 224 * 3);
  const input = tf.tensor4d(new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4), [n, 224, 224, 3]);
  fs.writeFileSync(out, Buffer.from((await features.predict(input).data()).buffer));
})();
"""


def install() -> pathlib.Path:
    target = cache_root() / f"tfjs-{TFJS_VERSION}"
    if not (target / "node_modules" / "@tensorflow" / "tfjs-layers").exists():
        staging = pathlib.Path(tempfile.mkdtemp(dir=cache_root(), prefix="tfjs-"))
        subprocess.run(["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--ignore-scripts",
                        *PACKAGES], check=True, capture_output=True, text=True, timeout=600)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    (target / "features.js").write_text(SCRIPT)
    return target


def mobilenet_features(model_js: str, shard_js: str, pixels_nhwc: np.ndarray, layer: str = "out_relu",
                       ) -> np.ndarray:
    """The named layer's output for float32 pixels [N, 224, 224, 3] (as the model takes them)."""
    home = install()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        (work / "model.js").write_text(model_js)
        (work / "shard.js").write_text(shard_js)
        np.ascontiguousarray(pixels_nhwc, dtype=np.float32).tofile(work / "pixels.bin")
        subprocess.run(["node", str(home / "features.js"), str(work / "model.js"), str(work / "shard.js"),
                        str(work / "pixels.bin"), str(work / "out.bin"), layer], check=True, capture_output=True,
                       text=True, timeout=300, cwd=home)
        return np.fromfile(work / "out.bin", dtype=np.float32)
