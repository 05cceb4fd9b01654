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
  PodMonitor    <name>             when the monitoring.coreos.com API exists
  PrometheusRule <name>-slo        likewise: SLO recording rules and burn-rate alerts (slo_rules.py)

Shutdown: every pod waits PRESTOP_S in a preStop sleep (endpoints and routers stop sending it work),
then gets SIGTERM and drains for at most DRAIN_S (workers finish or hand over their streams; the
router finishes its requests); terminationGracePeriodSeconds leaves a margin above both. Worker pools
roll one pod at a time and never surge (a surge pod would need accelerators the pool may not have).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

from triphase.common import labels
from triphase.operator import slo_rules
from triphase.operator.api.v1alpha1 import API_VERSION, PoolSpec, ServingDeploymentSpec

GRPC_PORT = labels.DEFAULT_GRPC_PORT
ROUTER_ROLE = "triphase-router"  # ClusterRole shipped with the operator (the chart's: --router-cluster-role)
METRICS_PORT = 9100
HTTP_PORT = 8000
MODEL_MOUNT = "/models"
PRESTOP_S = 5
DRAIN_S = 60
GRACE_S = PRESTOP_S + DRAIN_S + 10


def _graceful(container: dict[str, Any]) -> dict[str, Any]:
    """The container with the preStop wait and its drain time (see the module docstring)."""
    container["args"] = [*container["args"], "--drain-timeout", str(DRAIN_S)]
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
    spec: dict[str, Any] = {"deployment": name, "role": role}
    if with_replicas:
        spec["replicas"] = pool.replicas
    return {"apiVersion": API_VERSION, "kind": "ServingPool",
            "metadata": _meta(f"{name}-{role}", namespace, name, {labels.ROLE: role}), "spec": spec}


Objects = list[dict[str, Any]]


def _model_args_and_volumes(spec: ServingDeploymentSpec) -> tuple[list[str], Objects, Objects]:
    model = spec.model
    if model.source == "bundled":
        args: list[str] = []
        volumes: list[dict[str, Any]] = []
    elif model.source == "path":
        args, volumes = ["--model", str(model.path)], []
    else:
        source = {"persistentVolumeClaim": {"claimName": model.pvc, "readOnly": True}} if model.source == "pvc" \
            else {"image": {"reference": model.image, "pullPolicy": "IfNotPresent"}}
        volumes = [{"name": "model", **source}]
        args = ["--model", f"{MODEL_MOUNT}/{model.path}" if model.path else MODEL_MOUNT]
    mounts = [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}] if volumes else []
    return args, volumes, mounts


def worker_deployment(name: str, namespace: str, role: str, pool: PoolSpec, spec: ServingDeploymentSpec,
                      replicas: int, config_digest: str) -> dict[str, Any]:
    model_args, volumes, mounts = _model_args_and_volumes(spec)
    engine = pool.engine
    args = ["worker", "--role", role, "--host", "0.0.0.0", "--port", str(GRPC_PORT),
            "--metrics-port", str(METRICS_PORT), "--kv-transfer", spec.kv_transfer.backend,
            "--max-batched-tokens", str(engine.max_batched_tokens), "--max-num-seqs", str(engine.max_num_seqs),
            "--kv-cache-mib", str(engine.kv_cache_mib), "--dtype", engine.dtype, *model_args]
    resources = pool.resources.model_dump(exclude_none=True)
    container: dict[str, Any] = {
        "name": "worker", "image": spec.image, "args": args,
        "ports": [{"name": labels.GRPC_PORT_NAME, "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"grpc": {"port": GRPC_PORT}, "periodSeconds": 5},
        "resources": {k: {q: str(v) for q, v in quantities.items()} for k, quantities in resources.items()},
        "env": [e.model_dump() for e in pool.env or []],
        "volumeMounts": mounts,
    }
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
    model_args, volumes, mounts = _model_args_and_volumes(spec)
    selector = {labels.DEPLOYMENT: name, labels.COMPONENT: "router"}
    workers = f"{labels.DEPLOYMENT}={name},{labels.COMPONENT}=worker"
    args = ["router", "--discovery", "kubernetes", "--selector", workers, "--host", "0.0.0.0", "--port",
            str(HTTP_PORT), *model_args]
    if spec.model.served_name:
        args += ["--served-model-name", spec.model.served_name]
    container = {
        "name": "router", "image": spec.image, "args": args,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
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
                     "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"},
                                             {"port": "http", "path": "/metrics"}]}}


def slo_rule(name: str, namespace: str, spec: ServingDeploymentSpec,
             extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """spec.slo as recording rules and burn-rate alerts (slo_rules.py); `extra_labels` as for the PodMonitor."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": _meta(f"{name}-slo", namespace, name, extra_labels),
            "spec": {"groups": slo_rules.groups(name, namespace, spec.slo)}}


def children(name: str, namespace: str, spec: ServingDeploymentSpec, replicas: dict[str, int], *,
             monitoring: Collection[str] = (), monitoring_labels: dict[str, str] | None = None,
             router_role: str = ROUTER_ROLE) -> list[dict[str, Any]]:
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
                disruption_budget(name, namespace, "router", {labels.DEPLOYMENT: name, labels.COMPONENT: "router"})]
    if "PodMonitor" in monitoring:
        objects.append(pod_monitor(name, namespace, monitoring_labels))
    if "PrometheusRule" in monitoring:
        objects.append(slo_rule(name, namespace, spec, monitoring_labels))
    return objects
