"""KubeRay's CRDs (ray.io: RayService, RayCluster, RayJob) as KubeRay publishes them, from its operator's
module on the Go module proxy: a control plane that serves them validates deploy/ray/rayservice.yaml as a
cluster with KubeRay installed would."""

from __future__ import annotations

import pathlib

from triphase.local.gobuild import cache_root, module_files

MODULE = "github.com/ray-project/kuberay/ray-operator"
VERSION = "v1.5.0"  # the newest the proxy serves (2026-12-01)
CRDS = "config/crd/bases"


def crds(kinds: tuple[str, ...] = ("rayservices", "rayclusters")) -> list[pathlib.Path]:
    return module_files(MODULE, VERSION, CRDS, [f"ray.io_{kind}.yaml" for kind in kinds],
                        cache_root() / f"kuberay-{VERSION}")
