"""Spec -> child objects, as plain dicts (no API server needed)."""

from __future__ import annotations

import pathlib

import yaml

from triphase.operator import builders
from triphase.operator.api.v1alpha1 import ServingDeploymentSpec

ROOT = pathlib.Path(__file__).resolve().parents[3]
SPEC = ServingDeploymentSpec.model_validate(
    yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2-disaggregated.yaml").read_text())["spec"])


def _by_name(objects):
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_children_of_the_sample():
    objects = _by_name(builders.children("llm", "ns", SPEC, {"decode": 3}, monitoring=()))
    assert sorted(objects) == sorted([
        ("ConfigMap", "llm-config"), ("ServiceAccount", "llm-router"),
        ("RoleBinding", "llm-router"), ("Deployment", "llm-prefill"), ("PodDisruptionBudget", "llm-prefill"),
        ("Deployment", "llm-decode"), ("PodDisruptionBudget", "llm-decode"), ("Deployment", "llm-router"),
        ("Service", "llm"), ("PodDisruptionBudget", "llm-router")])
    decode = objects[("Deployment", "llm-decode")]
    assert decode["spec"]["replicas"] == 3  # from the ServingPool, not the spec's initial count
    assert objects[("Deployment", "llm-prefill")]["spec"]["replicas"] == 1
    pod = decode["spec"]["template"]
    assert pod["metadata"]["labels"]["triphase.dev/role"] == "decode"
    assert pod["metadata"]["labels"]["triphase.dev/component"] == "worker"
    container = pod["spec"]["containers"][0]
    assert container["args"][:3] == ["worker", "--role", "decode"]
    assert container["args"][container["args"].index("--max-num-seqs") + 1] == "128"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in container["ports"]
    router = objects[("Deployment", "llm-router")]["spec"]["template"]["spec"]
    assert router["serviceAccountName"] == "llm-router"
    assert "triphase.dev/deployment=llm,triphase.dev/component=worker" in router["containers"][0]["args"]
    service = objects[("Service", "llm")]["spec"]
    assert service["ports"][0]["port"] == 8000 and service["selector"]["triphase.dev/component"] == "router"
    with_monitor = _by_name(builders.children("llm", "ns", SPEC, {}, monitoring={"PodMonitor", "PrometheusRule"},
                                              monitoring_labels={"release": "prometheus"}))
    assert with_monitor[("PodMonitor", "llm")]["metadata"]["labels"]["release"] == "prometheus"
    assert with_monitor[("PrometheusRule", "llm-slo")]["metadata"]["labels"]["release"] == "prometheus"
    only_monitors = _by_name(builders.children("llm", "ns", SPEC, {}, monitoring={"PodMonitor"}))
    assert ("PodMonitor", "llm") in only_monitors and ("PrometheusRule", "llm-slo") not in only_monitors


def test_a_config_change_changes_the_pod_template_hash():
    changed = SPEC.model_copy(deep=True)
    changed.pools.decode.engine.max_batched_tokens = 256  # type: ignore[union-attr]

    def digest(spec):
        return _by_name(builders.children("llm", "ns", spec, {}, monitoring=()))[("Deployment", "llm-decode")][
            "spec"]["template"]["metadata"]["annotations"]["triphase.dev/config-hash"]

    assert digest(changed) != digest(SPEC)


def test_model_from_a_pvc_is_mounted_read_only():
    spec = SPEC.model_copy(update={"model": SPEC.model.model_copy(update={"source": "pvc", "pvc": "weights",
                                                                            "path": "llama.gguf"})})
    deployment = builders.worker_deployment("llm", "ns", "decode", spec.pools.decode, spec, 1, "h")  # type: ignore[arg-type]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/llama.gguf"


def test_serving_pool_carries_replicas_only_on_creation():
    pool = SPEC.pools.decode
    assert builders.serving_pool("llm", "ns", "decode", pool, with_replicas=True)["spec"]["replicas"] == 2
    assert "replicas" not in builders.serving_pool("llm", "ns", "decode", pool, with_replicas=False)["spec"]


def test_pods_drain_inside_their_grace_period():
    objects = _by_name(builders.children("llm", "ns", SPEC, {}, monitoring=()))
    for name in ("llm-decode", "llm-prefill", "llm-router"):
        deployment = objects[("Deployment", name)]["spec"]
        pod = deployment["template"]["spec"]
        container = pod["containers"][0]
        wait = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = float(container["args"][container["args"].index("--drain-timeout") + 1])
        assert wait + drain < pod["terminationGracePeriodSeconds"]
    for role in ("decode", "prefill"):  # one worker at a time, no surge pod needing accelerators
        strategy = objects[("Deployment", f"llm-{role}")]["spec"]["strategy"]
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_every_pod_follows_the_restricted_profile():
    """What the Pod Security "restricted" level checks (the operator tests' namespace enforces it too)."""
    objects = builders.children("llm", "ns", SPEC, {}, monitoring=())
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]
    assert len(pods) == 3
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            mounted = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounted  # writable scratch (HOME) on a read-only root
            assert {"name": "HOME", "value": "/tmp"} in container["env"]
        allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret", "image"}
        assert all(set(v) - {"name"} <= allowed for v in pod["volumes"]), pod["volumes"]
