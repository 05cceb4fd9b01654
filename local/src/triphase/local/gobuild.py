"""Building pinned Go tools from the Go module proxy into the triphase cache.

Used for the binaries the tests and the local tooling run (the Kubernetes control plane, Prometheus):
nothing is downloaded from release sites and nothing is committed. Each tool set lives in a
directory of the cache keyed by its pinned versions, so an unchanged set is reused by every checkout
and CI run. Builds print progress to stderr.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

from triphase.common.errors import UserError
from triphase.common.process.endpoints_file import replace_text


def cache_root() -> pathlib.Path:
    base = os.environ.get("TRIPHASE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "triphase")
    return pathlib.Path(base)


def go_binary(purpose: str) -> str:
    go = shutil.which("go")
    if go is None:
        raise UserError(f"building {purpose} needs Go (https://go.dev) on PATH")
    return go


def say(progress: bool, who: str, message: str) -> None:
    if progress:
        sys.stderr.write(f"{who}: {message}\n")
        sys.stderr.flush()


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")
    env["GOFLAGS"] = "-buildvcs=false -mod=mod"
    env["CGO_ENABLED"] = "0"
    return env


def run_go(go_path: str, args: list[str], cwd: pathlib.Path) -> None:
    proc = subprocess.run([go_path, *args], cwd=cwd, env=go_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-20:])
        raise UserError(f"`go {' '.join(args)}` failed in {cwd}:\n{tail}")


def go_mod_file(go_path: str, module: str, version: str, cwd: pathlib.Path) -> str:
    proc = subprocess.run([go_path, "mod", "download", "-json", f"{module}@{version}"], cwd=cwd, env=go_env(),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"cannot download {module}@{version} from the Go module proxy: {proc.stderr.strip()}")
    return pathlib.Path(json.loads(proc.stdout)["GoMod"]).read_text()


def go_install(go_path: str, packages: list[str], bin_dir: pathlib.Path, ldflags: str = "-s -w") -> None:
    """`go install` of `module/cmd/x@version` packages (module mode, no local go.mod) into `bin_dir`."""
    proc = subprocess.run([go_path, "install", "-trimpath", "-ldflags", ldflags, *packages], cwd=bin_dir.parent,
                          env={**go_env(), "GOBIN": str(bin_dir), "GOFLAGS": "-buildvcs=false"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-20:])
        raise UserError(f"`go install {' '.join(packages)}` failed:\n{tail}")


def module_files(module: str, version: str, subdir: str, names: list[str], target: pathlib.Path) -> list[pathlib.Path]:
    """Files of a module as it is published on the Go module proxy (downloaded once into `target`, the
    checksums verified by the go command): e.g. the CRDs a project ships beside its Go code."""
    wanted = [target / name for name in names]
    if all(path.is_file() for path in wanted):
        return wanted
    go = go_binary(f"files of {module}")
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([go, "mod", "download", "-json", f"{module}@{version}"], cwd=target, env=go_env(),
                          capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise UserError(f"cannot download {module}@{version}: {proc.stderr.strip()}")
    source = pathlib.Path(json.loads(proc.stdout)["Dir"]) / subdir
    for path in wanted:
        replace_text(path, (source / path.name).read_text())  # whole or absent, never half
    return wanted
