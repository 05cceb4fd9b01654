"""deploy/ray/rayservice.yaml on the project's control plane with KubeRay's own CRDs (from its module on
the Go module proxy): the API server accepts it, and refuses a broken one naming the field."""

from __future__ import annotations

import pytest
import yaml

from tests.ray_local import REPO
from triphase.local import kuberay

RAYSERVICE = REPO / "deploy" / "ray" / "rayservice.yaml"


@pytest.fixture(scope="module")
def kuberay_crds(kube):
    for path in kuberay.crds():
        kube.kubectl("apply", "--server-side", "-f", str(path))
    kube.kubectl("wait", "--for=condition=Established", "crd/rayservices.ray.io", "crd/rayclusters.ray.io",
                 "--timeout=60s")


def test_the_rayservice_is_accepted_as_written(kube, kuberay_crds) -> None:
    kube.kubectl("apply", "--server-side", "-f", str(RAYSERVICE))
    stored = yaml.safe_load(kube.kubectl("get", "rayservice", "triphase", "-o", "yaml").stdout)
    sent = yaml.safe_load(RAYSERVICE.read_text())
    assert stored["spec"]["serveConfigV2"] == sent["spec"]["serveConfigV2"]
    assert stored["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_broken_rayservice_is_refused_with_the_field_named(kube, kuberay_crds, tmp_path) -> None:
    broken = yaml.safe_load(RAYSERVICE.read_text())
    broken["metadata"]["name"] = "broken"
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "four"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    refused = kube.kubectl("apply", "--server-side", "-f", str(path), check=False)
    assert refused.returncode != 0
    assert "spec.rayClusterConfig.workerGroupSpecs[0].replicas" in refused.stderr, refused.stderr
