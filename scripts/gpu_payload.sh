#!/usr/bin/env bash
# Prepare, on this machine, what `benchmarks/gpu.py` needs on a lent GPU machine (the `device` tool):
# its image has Python 3.12 with torch, transformers, grpc and most of our dependencies, reaches no
# network, and takes at most 64 MiB a call. Missing there: the wheels below (NIXL's alone is 59 MB),
# and the bundled model (a 98 MB GGUF): the check runs SmolLM2-135M's shape with random weights and
# the bundled tokenizer (`gpu.py --random-model`). Writes .gpu/ (ignored by git):
#   .gpu/whl-a/      everything but NIXL (~15 MB)       .gpu/whl-b/  nixl + nixl-cu13 (~59 MB)
#   .gpu/tokenizer/  tokenizer.json + tokenizer_config.json of the bundled model
# and prints the two `run` calls, which must follow each other within the machine's 30 s warm time
# (the second reuses .gpu/site, installed by the first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/venv.sh")
out="$root/.gpu"
rm -rf "$out" && mkdir -p "$out/whl-a" "$out/whl-b"
fetch() {  # DIR PACKAGE==VERSION...: CPython 3.12 x86-64 wheels, no dependencies
    local dir=$1; shift
    "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "$@"
}
version() { "$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Pinned to what this checkout's tests ran with: generated protobuf and gRPC code checks its runtime.
fetch "$out/whl-a" "gguf==$(version gguf)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)" \
    "cryptography==$(version cryptography)" "cffi==$(version cffi)" "pycparser==$(version pycparser)" \
    "protobuf==$(version protobuf)" "grpcio==$(version grpcio)" \
    "grpcio-health-checking==$(version grpcio-health-checking)"
fetch "$out/whl-b" "nixl==$(version nixl)" "nixl-cu13==$(version nixl-cu13)"
(cd "$root/benchmarks" && "$venv/bin/python" gpu.py --export-tokenizer "$out/tokenizer")
du -sh "$out"/* >&2
paths="common/src:workers/src:router/src:operator/src:local/src:control/src:cli/src:proto/gen"
setup="export PYTHONPATH=\$PWD/.gpu/site:$(echo "$paths" | sed 's#\([^:]*\)#$PWD/\1#g') PYTHONUNBUFFERED=1"
install="python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site"
cat <<RUNS
run 1 (carry [".gpu/whl-a", ".gpu/tokenizer"], timeout_s 420):
  $install .gpu/whl-a/*.whl && $setup && cd benchmarks && python3 gpu.py --random-model ../.gpu/tokenizer --only env,exact,decode,big,ttft --output \$OUT/gpu-1.json --no-report
run 2, within 30 s (carry [".gpu/whl-b", ".gpu/tokenizer"], timeout_s 300):
  $install .gpu/whl-b/*.whl && $setup && cd benchmarks && python3 gpu.py --random-model ../.gpu/tokenizer --only env,handoff,stack,mixed --output \$OUT/gpu-2.json --no-report
then here: python benchmarks/gpu.py --render <files_at>/gpu-1.json <files_at>/gpu-2.json
RUNS
