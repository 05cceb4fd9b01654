"""Kubernetes binaries for the local control plane, built from the Go module proxy into a cache
(triphase.local.gobuild: nothing downloaded from release sites, nothing committed).

`k8s.io/kubernetes` cannot be `go install`ed directly (its go.mod replaces the `k8s.io/*` staging
modules with local paths), so a small tools module requires it and pins every staging module to the
matching `v0.<minor>.<patch>` release instead; etcd's server module has the same problem and gets the
same treatment. kwok and helm install as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import re
import time

from triphase.common.errors import UserError
from triphase.local.gobuild import cache_root, go_binary, go_install, go_mod_file, run_go, say

logger = logging.getLogger(__name__)

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"

KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ALL_TOOLS = (*KUBERNETES_COMMANDS, "etcd", "kwok", "helm")




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
    go = go_binary("the Kubernetes test binaries")
    root = tools_dir()
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    steps = [
        ("kubernetes", lambda: _build_kubernetes(go, root, bin_dir)),
        ("etcd", lambda: _build_etcd(go, root, bin_dir)),
        ("kwok", lambda: go_install(go, [f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"], bin_dir)),
        ("helm", lambda: go_install(go, [f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"], bin_dir)),
    ]
    wanted = {"kubernetes": KUBERNETES_COMMANDS, "etcd": ("etcd",), "kwok": ("kwok",), "helm": ("helm",)}
    for index, (name, build) in enumerate(steps, 1):
        if all((bin_dir / tool).is_file() for tool in wanted[name]):
            continue
        started = time.monotonic()
        say(progress, "triphase cluster", f"[{index}/{len(steps)}] building {', '.join(wanted[name])} from the Go "
                                          f"module proxy into {bin_dir} (first run only; several minutes)")
        build()
        say(progress, "triphase cluster",
            f"[{index}/{len(steps)}] {name} built in {time.monotonic() - started:.0f} s")
    tools = installed()
    if tools is None:
        missing = [name for name in ALL_TOOLS if not (bin_dir / name).is_file()]
        raise UserError(f"Kubernetes binaries missing after the build: {', '.join(missing)}")
    return tools










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
    run_go(go, ["mod", "tidy"], work)


def _build_kubernetes(go: str, root: pathlib.Path, bin_dir: pathlib.Path) -> None:
    work = root / "src-kubernetes"
    work.mkdir(parents=True, exist_ok=True)
    go_mod = go_mod_file(go, "k8s.io/kubernetes", KUBERNETES_VERSION, work)
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
    run_go(go, ["build", "-trimpath", "-ldflags", f"-s -w {stamp}", "-o", str(bin_dir) + "/", *packages], work)


def _build_etcd(go: str, root: pathlib.Path, bin_dir: pathlib.Path) -> None:
    work = root / "src-etcd"
    work.mkdir(parents=True, exist_ok=True)
    go_mod = go_mod_file(go, "go.etcd.io/etcd/server/v3", ETCD_VERSION, work)
    pins = {path: ETCD_VERSION for path in _local_replacements(go_mod)}
    _tools_module(go, work, "go.etcd.io/etcd/server/v3", ETCD_VERSION, ["go.etcd.io/etcd/server/v3"], pins)
    run_go(go, ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(bin_dir / "etcd"), "go.etcd.io/etcd/server/v3"],
        work)

