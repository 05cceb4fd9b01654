"""Pure functions: a ServingDeployment's spec -> the Kubernetes objects that serve it.

No I/O and no kopf: every object is a plain dict ready for server-side apply, so each can be checked
in a unit test. Owner references are added by the reconciler (it knows the parent's uid).

Children of ServingDeployment `<name>`:
  ServingPool   <name>-<role>      one per pool (spec.replicas only set on creation: /scale owns it)
  Deployment    <name>-<role>      the pool's workers, replicas from the ServingPool
  Deployment    <name>-router      the OpenAI front end, discovering workers by label
  Service       <name>             the API endpoint
  ConfigMap     <name>-config      engine and router configuration (also hashed into pod annotations,
                                   so a change rolls the pods)
  PodDisruptionBudget <name>-<role>, <name>-router
  ServiceAccount/Role/RoleBinding  <name>-router (get/list/watch pods: worker discovery)
  NetworkPolicy <name>-workers, <name>-router   who may reach the pods (`network_policies`)
  Secret        <name>-mtls-ca, <name>-mtls-worker, <name>-mtls-router   security.py (applied by the
                                   reconciler, which checks their certificates; the pods mount the bundles)
  PodMonitor    <name>             when the monitoring.coreos.com API exists
  PrometheusRule <name>-slo        likewise: SLO recording rules and burn-rate alerts (slo_rules.py)

Security (docs/security.md): workers and router talk mTLS with the bundles security.py keeps in Secrets
(MTLS_MOUNT); gRPC probes, which carry no certificate, go to the workers' plaintext health port, and the
router's probes and metrics to its internal port (`metrics`), so the API port serves only the API (with
the keys of router.apiKeySecretRef, over HTTPS with router.tls).

Shutdown: every pod waits PRESTOP_S in a preStop sleep (endpoints and routers stop sending it work),
then gets SIGTERM and drains for at most DRAIN_S (workers finish or hand over their streams; the
router finishes its requests); terminationGracePeriodSeconds leaves a margin above both. Worker pools
roll one pod at a time and never surge (a surge pod would need accelerators the pool may not have).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from typing import Any

from triphase.common import labels, slo_rules
from triphase.common.stack import Engine, Stack
from triphase.operator.api.v1alpha1 import API_VERSION, PoolSpec, ServingDeploymentSpec

GRPC_PORT = labels.DEFAULT_GRPC_PORT
ROUTER_ROLE = "triphase-router"  # ClusterRole shipped with the operator (the chart's: --router-cluster-role)
METRICS_PORT = 9100  # workers' /metrics; the router's /metrics and /readyz (its --internal-port)
HEALTH_PORT = 9101  # workers' plaintext gRPC health checking (probes)
HTTP_PORT = 8000
MODEL_MOUNT = "/models"
MTLS_MOUNT = "/etc/triphase/mtls"
API_KEYS_MOUNT = "/etc/triphase/api-keys"
TLS_MOUNT = "/etc/triphase/tls"
OPERATOR_COMPONENT = "operator"  # the operator's pods carry triphase.dev/component=operator (the chart)
PRESTOP_S = 5
DRAIN_S = 60
GRACE_S = PRESTOP_S + DRAIN_S + 10


def _graceful(container: dict[str, Any]) -> dict[str, Any]:
    """The container with the preStop wait (see the module docstring; its drain time is the stack's)."""
    container["lifecycle"] = {"preStop": {"sleep": {"seconds": PRESTOP_S}}}
    return container


# Every pod follows the Pod Security "restricted" profile: non-root, no privilege escalation, no
# capabilities, RuntimeDefault seccomp, a read-only root filesystem. What the processes write goes to
# emptyDirs: /tmp (HOME too: caches of Python libraries) and, for workers, /dev/shm (UCX's shared memory
# transport for NIXL between processes of one node).
RUN_AS = 10001
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
SCRATCH = "/tmp"


def _restricted(pod_spec: dict[str, Any], *, shared_memory: bool) -> dict[str, Any]:
    """The pod spec with the restricted profile's settings and its writable scratch volumes."""
    pod_spec["securityContext"] = dict(POD_SECURITY)
    pod_spec["volumes"] = [*pod_spec.get("volumes", []), {"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": SCRATCH}]
    if shared_memory:
        pod_spec["volumes"].append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    for container in pod_spec["containers"]:
        container["securityContext"] = {**CONTAINER_SECURITY, "capabilities": {"drop": ["ALL"]}}
        container["volumeMounts"] = [*container.get("volumeMounts", []), *mounts]
        env = container.get("env") or []
        if not any(e.get("name") == "HOME" for e in env):
            container["env"] = [{"name": "HOME", "value": SCRATCH}, *env]
    return pod_spec


def common_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "triphase", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/managed-by": "triphase-operator", labels.DEPLOYMENT: name}


def worker_selector(name: str, role: str) -> dict[str, str]:
    return {labels.DEPLOYMENT: name, labels.COMPONENT: "worker", labels.ROLE: role}


def workers_selector(name: str, role: str | None = None) -> str:
    """Deployment `name`'s worker pods (of the pool with `role`, when given) as a label selector
    string, the form a LIST and the router's --selector take."""
    wanted = {labels.DEPLOYMENT: name, labels.COMPONENT: "worker"} if role is None else worker_selector(name, role)
    return ",".join(f"{k}={v}" for k, v in wanted.items())


def _meta(name: str, namespace: str, parent: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {**common_labels(parent), **(extra or {})}}


def pools(spec: ServingDeploymentSpec) -> dict[str, PoolSpec]:
    return {role: pool for role in ("encode", "prefill", "decode") if (pool := getattr(spec.pools, role))}


def config_map(name: str, namespace: str, spec: ServingDeploymentSpec) -> dict[str, Any]:
    config = {
        "model": spec.model.model_dump(by_alias=True, exclude_none=True),
        "router": {"routingPolicy": spec.router.routing_policy, "port": HTTP_PORT},
        "kvTransfer": spec.kv_transfer.backend,
        "pools": {role: pool.engine.model_dump(by_alias=True) for role, pool in pools(spec).items()},
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{name}-config", namespace, name),
            "data": {"triphase.json": json.dumps(config, indent=1, sort_keys=True)}}


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config["data"], sort_keys=True).encode()).hexdigest()[:16]


def serving_pool(name: str, namespace: str, role: str, pool: PoolSpec, *, with_replicas: bool) -> dict[str, Any]:
    """The pool object; `with_replicas` only when creating it (afterwards /scale owns spec.replicas)."""
    spec: dict[str, Any] = {"deployment": name, "role": role, "selector": workers_selector(name, role)}
    if with_replicas:
        spec["replicas"] = pool.replicas
    return {"apiVersion": API_VERSION, "kind": "ServingPool",
            "metadata": _meta(f"{name}-{role}", namespace, name, {labels.ROLE: role}), "spec": spec}


Objects = list[dict[str, Any]]


def _model_and_volumes(spec: ServingDeploymentSpec) -> tuple[Stack, Objects, Objects]:
    """The stack as the pods see it (the model's path inside its volume), and that volume."""
    model = spec.model
    path: str | None = None
    if model.source == "bundled":
        volumes: list[dict[str, Any]] = []
    elif model.source == "path":
        path, volumes = str(model.path), []
    else:
        source = {"persistentVolumeClaim": {"claimName": model.pvc, "readOnly": True}} if model.source == "pvc" \
            else {"image": {"reference": model.image, "pullPolicy": "IfNotPresent"}}
        volumes = [{"name": "model", **source}]
        path = f"{MODEL_MOUNT}/{model.path}" if model.path else MODEL_MOUNT
    tokenizer = model.tokenizer
    if tokenizer and volumes and not tokenizer.startswith("/"):
        tokenizer = f"{MODEL_MOUNT}/{tokenizer}"
    mounts = [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}] if volumes else []
    stack = Stack(model=path, tokenizer=tokenizer, model_format=model.format, served_name=model.served_name,
                  kv_transfer=spec.kv_transfer.backend, drain_timeout_s=DRAIN_S,
                  routing_policy=spec.router.routing_policy)
    return stack, volumes, mounts


GPU_RESOURCE = "nvidia.com/gpu"
CPU_KV_CACHE_MIB = 1024  # a CPU pool's KV cache when the spec sets none


def gpus(pool: PoolSpec) -> int:
    """GPUs each worker of the pool asks for (limits, as the device plugin requires; else requests)."""
    for quantities in (pool.resources.limits, pool.resources.requests):
        if quantities and GPU_RESOURCE in quantities:
            value = str(quantities[GPU_RESOURCE]).strip()
            return int(value) if value.isdigit() else 1  # not a whole number: the kubelet refuses the pod
    return 0


def _engine(pool: PoolSpec) -> Engine:
    """A pool given GPUs computes on the first (`cuda`: a pod that lands without one fails loudly
    instead of decoding on its CPU); one without computes on its CPU even where the node has GPUs it
    was not allocated."""
    engine = pool.engine
    base = Engine(dtype=engine.dtype, max_num_seqs=engine.max_num_seqs, max_batched_tokens=engine.max_batched_tokens)
    if not gpus(pool):
        return dataclasses.replace(base, device="cpu", kv_cache_mib=engine.kv_cache_mib or CPU_KV_CACHE_MIB)
    if engine.kv_cache_mib is not None:
        return dataclasses.replace(base, device="cuda", kv_cache_mib=engine.kv_cache_mib)
    return dataclasses.replace(base, device="cuda", gpu_memory_fraction=engine.gpu_memory_fraction)


def worker_deployment(name: str, namespace: str, role: str, pool: PoolSpec, spec: ServingDeploymentSpec,
                      replicas: int, config_digest: str) -> dict[str, Any]:
    stack, volumes, mounts = _model_and_volumes(spec)
    args = [*stack.worker_args(role, _engine(pool)), "--host", "0.0.0.0", "--port", str(GRPC_PORT),
            "--metrics-port", str(METRICS_PORT), "--health-port", str(HEALTH_PORT), "--mtls-dir", MTLS_MOUNT]
    resources = pool.resources.model_dump(exclude_none=True)
    container: dict[str, Any] = {
        "name": "worker", "image": spec.image, "args": args,
        "ports": [{"name": labels.GRPC_PORT_NAME, "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "readinessProbe": {"grpc": {"port": HEALTH_PORT}, "periodSeconds": 5},
        "resources": {k: {q: str(v) for q, v in quantities.items()} for k, quantities in resources.items()},
        # the address peers reach it by, which its KV tickets name (`--advertise-host`)
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                *(e.model_dump() for e in pool.env or [])],
        "volumeMounts": [*mounts, {"name": "mtls", "mountPath": MTLS_MOUNT, "readOnly": True}],
    }
    volumes = [*volumes, _secret_volume("mtls", f"{name}-mtls-worker")]
    pod_spec = _restricted({"containers": [_graceful(container)], "volumes": volumes,
                            "terminationGracePeriodSeconds": GRACE_S}, shared_memory=True)
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    if pool.affinity:
        pod_spec["affinity"] = pool.affinity
    selector = worker_selector(name, role)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(f"{name}-{role}", namespace, name, selector),
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": {**common_labels(name), **selector},
                                      "annotations": {f"{labels.DOMAIN}/config-hash": config_digest}},
                         "spec": pod_spec},
        },
    }


def router_deployment(name: str, namespace: str, spec: ServingDeploymentSpec, config_digest: str) -> dict[str, Any]:
    stack, volumes, mounts = _model_and_volumes(spec)
    selector = {labels.DEPLOYMENT: name, labels.COMPONENT: "router"}
    args = [*stack.router_args(), "--discovery", "kubernetes", "--selector", workers_selector(name),
            "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--internal-host", "0.0.0.0",
            "--internal-port", str(METRICS_PORT), "--mtls-dir", MTLS_MOUNT]
    mounts = [*mounts, {"name": "mtls", "mountPath": MTLS_MOUNT, "readOnly": True}]
    volumes = [*volumes, _secret_volume("mtls", f"{name}-mtls-router")]
    keys = spec.router.api_key_secret_ref
    if keys is not None:  # a directory mount (no subPath): the kubelet updates it, the router re-reads it
        volumes.append(_secret_volume("api-keys", keys.name, items=[{"key": keys.key, "path": "keys"}]))
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
        args += ["--api-key-file", f"{API_KEYS_MOUNT}/keys"]
    if spec.router.tls is not None:
        volumes.append(_secret_volume("tls", spec.router.tls.secret_name))
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
        args += ["--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key"]
    container = {
        "name": "router", "image": spec.image, "args": args,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(f"{name}-router", namespace, name, selector),
        "spec": {
            "replicas": spec.router.replicas, "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": {**common_labels(name), **selector},
                                      "annotations": {f"{labels.DOMAIN}/config-hash": config_digest}},
                         "spec": _restricted({"serviceAccountName": f"{name}-router",
                                              "containers": [_graceful(container)], "volumes": volumes,
                                              "terminationGracePeriodSeconds": GRACE_S}, shared_memory=False)},
        },
    }


def _secret_volume(volume: str, secret: str, items: list[dict[str, str]] | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {"secretName": secret, "defaultMode": 0o440}  # readable by the pod's group (fsGroup)
    if items:
        source["items"] = items
    return {"name": volume, "secret": source}


def router_service(name: str, namespace: str, spec: ServingDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace, name),
        "spec": {"type": spec.router.service.type,
                 "selector": {labels.DEPLOYMENT: name, labels.COMPONENT: "router"},
                 "ports": [{"name": "http", "port": spec.router.service.port, "targetPort": "http",
                            "protocol": "TCP"}]},
    }


def router_rbac(name: str, namespace: str, cluster_role: str = ROUTER_ROLE) -> list[dict[str, Any]]:
    """The router's ServiceAccount, bound in this namespace to the shared ClusterRole `cluster_role`
    (deploy/manifests/operator-rbac.yaml: read pods, for worker discovery). One RoleBinding instead of a
    Role per deployment: nothing to order, and one write fewer per deployment."""
    account = f"{name}-router"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(account, namespace, name)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(account, namespace, name),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]},
    ]


def disruption_budget(name: str, namespace: str, component: str, selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(f"{name}-{component}", namespace, name),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}


def pod_monitor(name: str, namespace: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """`extra_labels`: what the Prometheus's podMonitorSelector looks for (the operator's --monitoring-label)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": _meta(name, namespace, name, extra_labels),
            "spec": {"selector": {"matchLabels": {labels.DEPLOYMENT: name}},
                     "podTargetLabels": [labels.DEPLOYMENT],  # the planner's selector
                     "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}]}}  # workers' and router's


def network_policies(name: str, namespace: str, spec: ServingDeploymentSpec,
                     operator_namespace: str) -> list[dict[str, Any]]:
    """Ingress of the deployment's pods. Workers: every port from each other (gRPC, and the ports UCX
    opens for NIXL reads, which authenticate nobody: docs/security.md), gRPC from the router and from
    the operator (the role balancer), metrics and health from anywhere in the cluster (Prometheus,
    probes). Router: the API port from where
    router.service exposes it (inside the cluster for a ClusterIP Service, anywhere otherwise), its
    internal port from inside the cluster. Egress is not restricted."""
    def pods(component: str) -> dict[str, Any]:
        return {"podSelector": {"matchLabels": {labels.DEPLOYMENT: name, labels.COMPONENT: component}}}

    cluster: list[dict[str, Any]] = [{"namespaceSelector": {}}]
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}},
                "podSelector": {"matchLabels": {labels.COMPONENT: OPERATOR_COMPONENT}}}
    workers = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(f"{name}-workers", namespace,
                                                                                       name),
        "spec": {"podSelector": pods("worker")["podSelector"], "policyTypes": ["Ingress"], "ingress": [
            {"from": [pods("worker")]},
            {"from": [pods("router"), operator], "ports": [{"port": GRPC_PORT, "protocol": "TCP"}]},
            {"from": cluster, "ports": [{"port": METRICS_PORT, "protocol": "TCP"},
                                        {"port": HEALTH_PORT, "protocol": "TCP"}]},
        ]},
    }
    api: dict[str, Any] = {"ports": [{"port": HTTP_PORT, "protocol": "TCP"}]}
    if spec.router.service.type == "ClusterIP":
        api["from"] = cluster
    router = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(f"{name}-router", namespace,
                                                                                       name),
        "spec": {"podSelector": pods("router")["podSelector"], "policyTypes": ["Ingress"], "ingress": [
            api, {"from": cluster, "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]}]},
    }
    return [workers, router]


def slo_rule(name: str, namespace: str, spec: ServingDeploymentSpec,
             extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """spec.slo as recording rules and burn-rate alerts (slo_rules.py); `extra_labels` as for the PodMonitor."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": _meta(f"{name}-slo", namespace, name, extra_labels),
            "spec": {"groups": slo_rules.groups(name, namespace, spec.slo)}}


def children(name: str, namespace: str, spec: ServingDeploymentSpec, replicas: dict[str, int], *,
             monitoring: Collection[str] = (), monitoring_labels: dict[str, str] | None = None,
             router_role: str = ROUTER_ROLE, operator_namespace: str = "triphase-system") -> list[dict[str, Any]]:
    """Every child except the ServingPools, in apply order. `replicas[role]` comes from the pools;
    `monitoring`: the Prometheus operator's kinds the API server serves (PodMonitor, PrometheusRule), whose
    objects get `monitoring_labels` (what the Prometheus selects them by)."""
    config = config_map(name, namespace, spec)
    digest = config_hash(config)
    objects = [config, *router_rbac(name, namespace, router_role)]
    for role, pool in pools(spec).items():
        objects.append(worker_deployment(name, namespace, role, pool, spec, replicas.get(role, pool.replicas),
                                         digest))
        objects.append(disruption_budget(name, namespace, role, worker_selector(name, role)))
    objects += [router_deployment(name, namespace, spec, digest), router_service(name, namespace, spec),
                disruption_budget(name, namespace, "router", {labels.DEPLOYMENT: name, labels.COMPONENT: "router"}),
                *network_policies(name, namespace, spec, operator_namespace)]
    if "PodMonitor" in monitoring:
        objects.append(pod_monitor(name, namespace, monitoring_labels))
    if "PrometheusRule" in monitoring:
        objects.append(slo_rule(name, namespace, spec, monitoring_labels))
    return objects
