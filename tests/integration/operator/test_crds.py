"""The generated CRDs on a real API server: a valid ServingDeployment is accepted and printed with its
columns; invalid ones are rejected by the API server itself with the offending field path; a
ServingPool scales through its /scale subresource, which reports its pods' selector."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
import yaml

from triphase.local.processes import wait_for
from triphase.operator.api.v1alpha1 import ServingDeploymentSpec

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[3]
SAMPLE = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2-disaggregated.yaml").read_text())


@pytest.fixture(scope="module")
def crds(kube):
    result = kube.kubectl("apply", "--server-side", "-f", str(ROOT / "deploy" / "crds"))
    assert "servingdeployments.triphase.dev" in result.stdout
    for name in ("servingdeployments", "servingpools"):
        wait_for(lambda name=name: "True" in kube.kubectl(
            "get", "crd", f"{name}.triphase.dev", "-o",
            'jsonpath={.status.conditions[?(@.type=="Established")].status}').stdout, 30, f"{name} established")
    return kube


def _apply(kube, obj):
    return kube.kubectl("apply", "-f", "-", check=False, input_text=json.dumps(obj))


def _variant(name, edit):
    obj = copy.deepcopy(SAMPLE)
    obj["metadata"]["name"] = name
    edit(obj["spec"])
    return obj


def test_the_sample_is_valid_for_the_models_and_the_api_server(crds):
    ServingDeploymentSpec.model_validate(SAMPLE["spec"])  # the operator parses what the API server stores
    result = _apply(crds, SAMPLE)
    assert result.returncode == 0, result.stderr
    table = crds.kubectl("get", "tsd", "smollm2").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "PREFILL", "DECODE", "ENCODE", "ENDPOINT", "AGE"]
    stored = json.loads(crds.kubectl("get", "servingdeployment", "smollm2", "-o", "json").stdout)
    assert stored["spec"]["kvTransfer"]["backend"] == "nixl"
    assert "format" not in stored["spec"]["model"]  # no default: a set format is checked against the files
    assert stored["spec"]["pools"]["decode"]["engine"]["gpuMemoryFraction"] == 0.9  # defaulted from the schema
    explain = crds.kubectl("explain", "servingdeployment.spec.pools.decode.replicas").stdout
    assert "ServingPool's /scale owns" in " ".join(explain.split())


@pytest.mark.parametrize("name,edit,path,words", [
    ("bad-enum", lambda s: s["kvTransfer"].update(backend="rdma"), "spec.kvTransfer.backend", "Unsupported value"),
    ("bad-bounds", lambda s: s["pools"]["decode"].update(minReplicas=5, maxReplicas=2), "spec.pools.decode",
     "minReplicas must be <= maxReplicas"),
    ("no-model", lambda s: s.pop("model"), "spec.model", "Required value"),
    ("gpu-fraction-above-1", lambda s: s["pools"]["decode"].setdefault("engine", {}).update(gpuMemoryFraction=1.5),
     "spec.pools.decode.engine.gpuMemoryFraction", "less than or equal to 1"),
    ("bad-format", lambda s: s["model"].update(format="onnx"), "spec.model.format", "Unsupported value"),
    ("negative-gpu", lambda s: s["pools"]["decode"]["resources"]["limits"].update({"nvidia.com/gpu": -1}),
     "spec.pools.decode.resources.limits", "must not be negative"),
    ("no-decode", lambda s: s["pools"].pop("decode"), "spec.pools", "at least one pool must decode"),
    ("path-without-path", lambda s: s["model"].update(source="path"), "spec.model", "source path needs path"),
    ("autoscaling-without-prometheus", lambda s: s.update(autoscaling={"enabled": True}), "spec.autoscaling",
     "enabled needs prometheusUrl"),
    ("autoscaling-bad-url", lambda s: s.update(autoscaling={"enabled": True, "prometheusUrl": "prometheus:9090"}),
     "spec.autoscaling.prometheusUrl", "must be an http:// or https:// URL"),
    ("autoscaling-bad-profile-name", lambda s: s.update(autoscaling={"profileConfigMap": "My Profile"}),
     "spec.autoscaling.profileConfigMap", "should match"),
    ("autoscaling-unbounded", lambda s: (s.update(autoscaling={"enabled": True, "prometheusUrl": "http://p:9090"}),
                                         s["pools"]["prefill"].pop("maxReplicas")),
     "spec", "autoscaling.enabled needs maxReplicas on the prefill and decode pools"),
    ("autoscaling-decode-to-zero", lambda s: (
        s.update(autoscaling={"enabled": True, "prometheusUrl": "http://p:9090"}),
        s["pools"]["prefill"].update(maxReplicas=4),
        s["pools"]["decode"].update(minReplicas=0, maxReplicas=4)), "spec", "pools.decode.minReplicas must be >= 1"),
    ("encode-bundled", lambda s: s["pools"].update(encode={"replicas": 1}), "spec",
     "an encode pool needs a model that takes images"),
])
def test_invalid_specs_are_rejected_with_the_field_path(crds, name, edit, path, words):
    result = _apply(crds, _variant(name, edit))
    assert result.returncode != 0
    assert path in result.stderr and words in result.stderr, result.stderr
    assert crds.kubectl("get", "tsd", name, check=False).returncode != 0  # nothing was stored


@pytest.mark.parametrize("sample", sorted(p.name for p in (ROOT / "deploy" / "samples").glob("*.yaml")))
def test_every_sample_is_valid_for_the_models_and_the_api_server(crds, sample):
    obj = yaml.safe_load((ROOT / "deploy" / "samples" / sample).read_text())
    ServingDeploymentSpec.model_validate(obj["spec"])
    result = crds.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input_text=json.dumps(obj))
    assert result.returncode == 0, result.stderr


POOL_SELECTOR = "triphase.dev/deployment=smollm2,triphase.dev/component=worker,triphase.dev/role=decode"


def test_serving_pool_scales_through_the_scale_subresource(crds):
    """/scale sets spec.replicas and reports the pool's pods' selector, which it has from the spec the
    operator creates the pool with: an autoscaler can find the pods from the pool's first moment."""
    pool = {"apiVersion": "triphase.dev/v1alpha1", "kind": "ServingPool", "metadata": {"name": "smollm2-decode"},
            "spec": {"deployment": "smollm2", "role": "decode", "replicas": 2, "selector": POOL_SELECTOR}}
    assert _apply(crds, pool).returncode == 0
    crds.kubectl("scale", "servingpool/smollm2-decode", "--replicas=3")
    stored = json.loads(crds.kubectl("get", "tsp", "smollm2-decode", "-o", "json").stdout)
    assert stored["spec"]["replicas"] == 3
    path = f"/apis/triphase.dev/v1alpha1/namespaces/{crds.namespace}/servingpools/smollm2-decode/scale"
    scale = json.loads(crds.kubectl("get", "--raw", path).stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["selector"] == POOL_SELECTOR


def test_a_serving_pool_selector_other_than_its_own_pods_is_rejected(crds):
    pool = {"apiVersion": "triphase.dev/v1alpha1", "kind": "ServingPool", "metadata": {"name": "smollm2-prefill"},
            "spec": {"deployment": "smollm2", "role": "prefill", "selector": POOL_SELECTOR}}  # decode's pods
    result = _apply(crds, pool)
    assert result.returncode != 0 and "spec.selector" in result.stderr
    assert "must select the pool's own pods" in result.stderr

