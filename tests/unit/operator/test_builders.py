"""Spec -> child objects, as plain dicts (no API server needed)."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import yaml

from triphase.operator import builders
from triphase.operator.api.v1alpha1 import ServingDeploymentSpec
from triphase.router import main as router_main
from triphase.router.policy.routing import POLICIES

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
        ("Service", "llm"), ("PodDisruptionBudget", "llm-router"), ("NetworkPolicy", "llm-workers"),
        ("NetworkPolicy", "llm-router")])
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


def test_serving_pool_names_its_pods_selector_for_scale():
    """The selector /scale reports comes with the pool (no status write needed): the pods of its
    Deployment, which the Deployment's own selector picks."""
    pool = builders.serving_pool("llm", "ns", "decode", SPEC.pools.decode, with_replicas=True)
    deployment = _by_name(builders.children("llm", "ns", SPEC, {"decode": 2}))[("Deployment", "llm-decode")]
    wanted = dict(term.split("=") for term in pool["spec"]["selector"].split(","))
    assert wanted == deployment["spec"]["selector"]["matchLabels"]


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


def _container(objects, name):
    pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _arg(container, flag):
    return container["args"][container["args"].index(flag) + 1]


def test_workers_and_router_mount_their_mtls_bundles_and_probe_without_certificates():
    objects = _by_name(builders.children("llm", "ns", SPEC, {}, monitoring=()))
    for name, secret in (("llm-decode", "llm-mtls-worker"), ("llm-prefill", "llm-mtls-worker"),
                         ("llm-router", "llm-mtls-router")):
        pod, container = _container(objects, name)
        assert _arg(container, "--mtls-dir") == builders.MTLS_MOUNT
        volume = next(v for v in pod["volumes"] if v["name"] == "mtls")
        assert volume["secret"]["secretName"] == secret
        assert {"name": "mtls", "mountPath": builders.MTLS_MOUNT, "readOnly": True} in container["volumeMounts"]
    _, worker = _container(objects, "llm-decode")
    assert worker["readinessProbe"] == {"grpc": {"port": builders.HEALTH_PORT}, "periodSeconds": 5}
    assert _arg(worker, "--health-port") == str(builders.HEALTH_PORT)
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in worker["env"]
    _, router = _container(objects, "llm-router")
    assert _arg(router, "--internal-port") == str(builders.METRICS_PORT)
    assert router["readinessProbe"]["httpGet"]["port"] == router["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert "--api-key-file" not in router["args"] and "--tls-cert" not in router["args"]


def test_api_keys_and_tls_come_from_the_named_secrets():
    spec = ServingDeploymentSpec.model_validate({**SPEC.model_dump(by_alias=True), "router": {
        "apiKeySecretRef": {"name": "client-keys", "key": "keys.txt"}, "tls": {"secretName": "api-cert"}}})
    pod, router = _container(_by_name(builders.children("llm", "ns", spec, {}, monitoring=())), "llm-router")
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert volumes["api-keys"]["secretName"] == "client-keys"
    assert volumes["api-keys"]["items"] == [{"key": "keys.txt", "path": "keys"}]  # no subPath: updates reach it
    assert volumes["tls"]["secretName"] == "api-cert"
    assert _arg(router, "--api-key-file") == f"{builders.API_KEYS_MOUNT}/keys"
    assert _arg(router, "--tls-cert") == f"{builders.TLS_MOUNT}/tls.crt"
    assert _arg(router, "--tls-key") == f"{builders.TLS_MOUNT}/tls.key"


def test_network_policies_admit_only_the_deployment_s_own_components():
    objects = _by_name(builders.children("llm", "ns", SPEC, {}, monitoring=(), operator_namespace="ops"))
    workers = objects[("NetworkPolicy", "llm-workers")]["spec"]
    assert workers["podSelector"] == {"matchLabels": {"triphase.dev/deployment": "llm",
                                                      "triphase.dev/component": "worker"}}
    peers, grpc, anywhere = workers["ingress"]
    # every port (UCX's, for NIXL reads) from the deployment's own workers only
    assert peers["from"] == [{"podSelector": {"matchLabels": {"triphase.dev/deployment": "llm",
                                                              "triphase.dev/component": "worker"}}}]
    assert "ports" not in peers
    router_peer, operator = grpc["from"]
    assert router_peer["podSelector"]["matchLabels"]["triphase.dev/component"] == "router"
    assert "namespaceSelector" not in router_peer  # this namespace only
    assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ops"}
    assert grpc["ports"] == [{"port": builders.GRPC_PORT, "protocol": "TCP"}]  # the router reaches gRPC only
    assert {p["port"] for p in anywhere["ports"]} == {builders.METRICS_PORT, builders.HEALTH_PORT}
    router = objects[("NetworkPolicy", "llm-router")]["spec"]
    api, internal = router["ingress"]
    assert api["from"] == [{"namespaceSelector": {}}] and internal["ports"][0]["port"] == builders.METRICS_PORT
    exposed = ServingDeploymentSpec.model_validate({**SPEC.model_dump(by_alias=True),
                                                    "router": {"service": {"type": "LoadBalancer"}}})
    api = _by_name(builders.children("llm", "ns", exposed, {}, monitoring=()))[("NetworkPolicy", "llm-router")][
        "spec"]["ingress"][0]
    assert "from" not in api and api["ports"] == [{"port": builders.HTTP_PORT, "protocol": "TCP"}]


def _worker_args(spec, role="decode"):
    objects = _by_name(builders.children("llm", "ns", spec, {}, monitoring=()))
    return objects[("Deployment", f"llm-{role}")]["spec"]["template"]["spec"]["containers"][0]["args"]


def _value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def test_a_pool_given_gpus_computes_on_one_and_sizes_its_kv_from_it():
    spec = SPEC.model_copy(deep=True)
    decode = spec.pools.decode
    decode.resources.limits = {"nvidia.com/gpu": "1"}
    decode.engine.kv_cache_mib = None
    decode.engine.gpu_memory_fraction = 0.8
    args = _worker_args(spec)
    assert _value(args, "--device") == "cuda"
    assert _value(args, "--gpu-memory-fraction") == "0.8" and "--kv-cache-mib" not in args
    decode.engine.kv_cache_mib = 4096  # the CRD's size wins when it is set
    args = _worker_args(spec)
    assert _value(args, "--kv-cache-mib") == "4096" and "--gpu-memory-fraction" not in args


def test_a_pool_without_gpus_computes_on_its_cpu_even_on_a_gpu_node():
    spec = SPEC.model_copy(deep=True)
    decode = spec.pools.decode
    decode.resources.limits = {"cpu": "4", "nvidia.com/gpu": 0}
    decode.engine.kv_cache_mib = None
    args = _worker_args(spec)
    assert _value(args, "--device") == "cpu" and _value(args, "--kv-cache-mib") == "1024"


def test_the_model_format_and_tokenizer_reach_the_workers_and_the_router():
    spec = SPEC.model_copy(deep=True)
    assert "--model-format" not in _worker_args(spec) and "--tokenizer" not in _worker_args(spec)
    spec.model.format = "safetensors"
    spec.model.source, spec.model.pvc, spec.model.path = "pvc", "weights", "llama"
    spec.model.tokenizer = "tokenizers/llama-chat"
    args = _worker_args(spec)
    assert _value(args, "--model-format") == "safetensors"
    assert _value(args, "--tokenizer") == "/models/tokenizers/llama-chat"  # inside the model's volume
    router = _by_name(builders.children("llm", "ns", spec, {}, monitoring=()))[("Deployment", "llm-router")]
    assert _value(router["spec"]["template"]["spec"]["containers"][0]["args"], "--tokenizer") == \
        "/models/tokenizers/llama-chat"
    spec.model.tokenizer = "/opt/tokenizer.json"  # an absolute path is used as it is
    assert _value(_worker_args(spec), "--tokenizer") == "/opt/tokenizer.json"


def test_the_served_name_labels_the_workers_series_as_the_routers():
    spec = SPEC.model_copy(deep=True)
    spec.model.served_name = "smol"
    assert _value(_worker_args(spec), "--served-model-name") == "smol"
    router = _by_name(builders.children("llm", "ns", spec, {}, monitoring=()))[("Deployment", "llm-router")]
    assert _value(router["spec"]["template"]["spec"]["containers"][0]["args"], "--served-model-name") == "smol"


@pytest.mark.parametrize("policy", ["kv-aware", "least-loaded", "round-robin"])
def test_the_routing_policy_reaches_the_router_as_its_own_parser_reads_it(policy):
    spec = SPEC.model_copy(deep=True)
    spec.router.routing_policy = policy
    router = _by_name(builders.children("llm", "ns", spec, {}, monitoring=()))[("Deployment", "llm-router")]
    command, *args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    parser = argparse.ArgumentParser()
    router_main.add_arguments(parser)
    assert command == "router"
    assert POLICIES[parser.parse_args(args).routing_policy].name == policy
