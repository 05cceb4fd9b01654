"""Kubernetes binaries for the local control plane, built from the Go module proxy into a cache.

Nothing is downloaded from release sites and nothing is committed: each tool is compiled from its Go
module at a pinned version. `k8s.io/kubernetes` cannot be `go install`ed directly (its go.mod replaces
the `k8s.io/*` staging modules with local paths), so a small tools module requires it and pins every
staging module to the matching `v0.<minor>.<patch>` release instead; etcd's server module has the same
problem and gets the same treatment. kwok and helm install as they are.

The cache directory is keyed by the pinned versions, so changing a version builds a new set and an
unchanged set is reused by every checkout and CI run. Builds print progress to stderr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

from triphase.common.errors import UserError

logger = logging.getLogger(__name__)

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"

KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ALL_TOOLS = (*KUBERNETES_COMMANDS, "etcd", "kwok", "helm")


def cache_root() -> pathlib.Path:
    base = os.environ.get("TRIPHASE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "triphase")
    return pathlib.Path(base)


def tools_dir() -> pathlib.Path:
    """Where this set of pinned versions lives (`<cache>/k8s-tools-<key>/bin`)."""
    pins = f"{KUBERNETES_VERSION} {ETCD_VERSION} {KWOK_VERSION} {HELM_VERSION}"
    key = hashlib.sha256(pins.encode()).hexdigest()[:12]
    return cache_root() / f"k8s-tools-{KUBERNETES_VERSION}-{key}"


@dataclasses.dataclass(frozen=True)
class Tools:
    """Paths of the built binaries."""

    bin: pathlib.Path

    def __getitem__(self, name: str) -> str:
        return str(self.bin / name)


def installed() -> Tools | None:
    bin_dir = tools_dir() / "bin"
    if all((bin_dir / name).is_file() for name in ALL_TOOLS):
        return Tools(bin_dir)
    return None


def ensure(progress: bool = True) -> Tools:
    """The binaries, building whichever are missing (minutes on first use, instant afterwards)."""
    tools = installed()
    if tools is not None:
        return tools
    go = shutil.which("go")
    if go is None:
        raise UserError("building the Kubernetes test binaries needs Go (https://go.dev) on PATH")
    root = tools_dir()
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    steps = [
        ("kubernetes", lambda: _build_kubernetes(go, root, bin_dir)),
        ("etcd", lambda: _build_etcd(go, root, bin_dir)),
        ("kwok", lambda: _go_install(go, f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}", bin_dir)),
        ("helm", lambda: _go_install(go, f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}", bin_dir)),
    ]
    wanted = {"kubernetes": KUBERNETES_COMMANDS, "etcd": ("etcd",), "kwok": ("kwok",), "helm": ("helm",)}
    for index, (name, build) in enumerate(steps, 1):
        if all((bin_dir / tool).is_file() for tool in wanted[name]):
            continue
        started = time.monotonic()
        _say(progress, f"[{index}/{len(steps)}] building {', '.join(wanted[name])} from the Go module proxy "
                       f"into {bin_dir} (first run only; several minutes)")
        build()
        _say(progress, f"[{index}/{len(steps)}] {name} built in {time.monotonic() - started:.0f} s")
    tools = installed()
    if tools is None:
        missing = [name for name in ALL_TOOLS if not (bin_dir / name).is_file()]
        raise UserError(f"Kubernetes binaries missing after the build: {', '.join(missing)}")
    return tools


def _say(progress: bool, message: str) -> None:
    if progress:
        sys.stderr.write(f"triphase cluster: {message}\n")
        sys.stderr.flush()


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")
    env["GOFLAGS"] = "-buildvcs=false -mod=mod"
    env["CGO_ENABLED"] = "0"
    return env


def _go(go: str, args: list[str], cwd: pathlib.Path) -> None:
    proc = subprocess.run([go, *args], cwd=cwd, env=_go_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-20:])
        raise UserError(f"`go {' '.join(args)}` failed in {cwd}:\n{tail}")


def _go_mod_file(go: str, module: str, version: str, cwd: pathlib.Path) -> str:
    proc = subprocess.run([go, "mod", "download", "-json", f"{module}@{version}"], cwd=cwd, env=_go_env(),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"cannot download {module}@{version} from the Go module proxy: {proc.stderr.strip()}")
    return pathlib.Path(json.loads(proc.stdout)["GoMod"]).read_text()


def _local_replacements(go_mod: str) -> list[str]:
    """Module paths that a go.mod replaces with a local directory (`x => ./staging/...`, `x => ../api`)."""
    found = re.findall(r"^\s*(?:replace\s+)?(\S+)\s+=>\s+(\.\.?/\S*)", go_mod, flags=re.MULTILINE)
    return [path for path, target in found if "FORBIDDEN" not in target]


def _tools_module(go: str, work: pathlib.Path, module: str, version: str, packages: list[str],
                  pins: dict[str, str]) -> None:
    """A throwaway module requiring `module@version` with its local replaces pinned to released versions."""
    work.mkdir(parents=True, exist_ok=True)
    replaces = "\n".join(f"\t{path} => {path} {pin}" for path, pin in sorted(pins.items()))
    (work / "go.mod").write_text(
        f"module triphase.dev/tools\n\ngo 1.26\n\nrequire {module} {version}\n\nreplace (\n{replaces}\n)\n")
    imports = "\n".join(f'\t_ "{package}"' for package in packages)
    (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")
    _go(go, ["mod", "tidy"], work)


def _build_kubernetes(go: str, root: pathlib.Path, bin_dir: pathlib.Path) -> None:
    work = root / "src-kubernetes"
    work.mkdir(parents=True, exist_ok=True)
    go_mod = _go_mod_file(go, "k8s.io/kubernetes", KUBERNETES_VERSION, work)
    staging = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    pins = {path: staging for path in _local_replacements(go_mod)}
    packages = [f"k8s.io/kubernetes/cmd/{name}" for name in KUBERNETES_COMMANDS]
    _tools_module(go, work, "k8s.io/kubernetes", KUBERNETES_VERSION, packages, pins)
    major, minor = KUBERNETES_VERSION.removeprefix("v").split(".")[:2]
    stamp = " ".join(
        f"-X {package}.{key}={value}"
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in (("gitVersion", KUBERNETES_VERSION), ("gitMajor", major), ("gitMinor", minor),
                           ("gitTreeState", "clean")))
    _go(go, ["build", "-trimpath", "-ldflags", f"-s -w {stamp}", "-o", str(bin_dir) + "/", *packages], work)


def _build_etcd(go: str, root: pathlib.Path, bin_dir: pathlib.Path) -> None:
    work = root / "src-etcd"
    work.mkdir(parents=True, exist_ok=True)
    go_mod = _go_mod_file(go, "go.etcd.io/etcd/server/v3", ETCD_VERSION, work)
    pins = {path: ETCD_VERSION for path in _local_replacements(go_mod)}
    _tools_module(go, work, "go.etcd.io/etcd/server/v3", ETCD_VERSION, ["go.etcd.io/etcd/server/v3"], pins)
    _go(go, ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(bin_dir / "etcd"), "go.etcd.io/etcd/server/v3"],
        work)


def _go_install(go: str, package: str, bin_dir: pathlib.Path) -> None:
    env_dir = bin_dir.parent
    proc = subprocess.run([go, "install", "-trimpath", "-ldflags", "-s -w", package], cwd=env_dir,
                          env={**_go_env(), "GOBIN": str(bin_dir), "GOFLAGS": "-buildvcs=false"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-20:])
        raise UserError(f"`go install {package}` failed:\n{tail}")
