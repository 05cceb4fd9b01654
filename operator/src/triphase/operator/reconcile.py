"""One idempotent, level-based reconcile of a ServingDeployment (no kopf import).

desired (from the spec and the ServingPools' replicas) -> server-side apply every child with an owner
reference -> observe the children -> status. Running it twice changes nothing; running it after a
crash half-way finishes the job; objects are named deterministically, so nothing is ever duplicated.
Deleting the ServingDeployment leaves cleanup to the garbage collector (owner references).

Pools are counted by the role each worker pod reports (`triphase.dev/current-role`, set by the router
or the worker when a role switch happens), falling back to the role it was created with; the
operator never relabels pods, so it never fights a runtime role switch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from pydantic import ValidationError

from triphase.common import labels
from triphase.operator import builders
from triphase.operator.api.v1alpha1 import API_VERSION, POOL_ROLES, ServingDeploymentSpec
from triphase.operator.conditions import set_condition
from triphase.operator.kube import Kube

logger = logging.getLogger(__name__)
CURRENT_ROLE = f"{labels.DOMAIN}/current-role"
INITIAL_REPLICAS_MANAGER = "triphase-operator-initial-replicas"


class InvalidSpec(Exception):
    """The spec passed the CRD schema but cannot be served; the message names the field. `status`
    (Degraded and not Ready, with the reason) is what the caller should write back."""

    def __init__(self, message: str, status: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status or {}


@dataclasses.dataclass
class Outcome:
    status: dict[str, Any]
    applied: list[str]  # "Kind/name" of every object applied
    ready: bool


def parse(spec: dict[str, Any]) -> ServingDeploymentSpec:
    try:
        return ServingDeploymentSpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in ("spec", *first["loc"]))
        raise InvalidSpec(f"{where}: {first['msg']}") from None


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": "ServingDeployment", "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _owned(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"]["ownerReferences"] = [owner]
    return obj


def _pod_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and not (pod["metadata"].get("deletionTimestamp")) and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


async def reconcile(kube: Kube, body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
    conditions = list((body.get("status") or {}).get("conditions") or [])
    try:
        spec = parse(body.get("spec") or {})
    except InvalidSpec as exc:
        conditions = set_condition(conditions, "Degraded", True, "InvalidSpec", str(exc), generation)
        conditions = set_condition(conditions, "Ready", False, "InvalidSpec", str(exc), generation)
        raise InvalidSpec(str(exc), {"observedGeneration": generation, "conditions": conditions}) from None

    owner = owner_reference(body)
    applied: list[str] = []
    wanted = builders.pools(spec)
    replicas: dict[str, int] = {}
    for role, pool in wanted.items():
        # The initial replicas are written once, by a separate field manager: our applies never carry
        # spec.replicas, so server-side apply never resets what /scale (or the planner) set since.
        if await kube.get(API_VERSION, "ServingPool", namespace, f"{name}-{role}") is None:
            await kube.create(_owned(builders.serving_pool(name, namespace, role, pool, with_replicas=True), owner),
                              INITIAL_REPLICAS_MANAGER)
        obj = _owned(builders.serving_pool(name, namespace, role, pool, with_replicas=False), owner)
        result = await kube.apply(obj)
        replicas[role] = int(result["spec"].get("replicas", pool.replicas))
        applied.append(f"ServingPool/{name}-{role}")
    for role in POOL_ROLES:  # a pool removed from the spec
        if role not in wanted:
            for api_version, kind in ((API_VERSION, "ServingPool"), ("apps/v1", "Deployment"),
                                      ("policy/v1", "PodDisruptionBudget")):
                if await kube.delete(api_version, kind, namespace, f"{name}-{role}"):
                    logger.info("Deleted %s %s-%s (pool removed)", kind, name, role)

    monitoring = await kube.has_api("monitoring.coreos.com/v1")
    objects = builders.children(name, namespace, spec, replicas, monitoring=monitoring)
    # RBAC in order (a RoleBinding's Role must exist first); the independent rest concurrently.
    ordered = [o for o in objects if o["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    for obj in ordered:
        await kube.apply(_owned(obj, owner))
    await asyncio.gather(*(kube.apply(_owned(obj, owner)) for obj in objects if obj not in ordered))
    applied += [f"{obj['kind']}/{obj['metadata']['name']}" for obj in objects]

    # ---- observe
    pods = await kube.list("v1", "Pod", namespace, f"{labels.DEPLOYMENT}={name},{labels.COMPONENT}=worker")
    pool_status: dict[str, Any] = {}
    summary: dict[str, str] = {}
    all_ready = True
    for role in wanted:
        mine = [p for p in pods if p["metadata"].get("labels", {}).get(labels.ROLE) == role]
        ready = [p for p in mine if _pod_ready(p)]
        by_role: dict[str, int] = {}
        for pod in ready:
            current = pod["metadata"].get("labels", {}).get(CURRENT_ROLE) or role
            by_role[current] = by_role.get(current, 0) + 1
        pool_status[role] = {"desired": replicas[role], "ready": len(ready), "byRole": by_role}
        summary[role] = f"{len(ready)}/{replicas[role]}"
        all_ready = all_ready and len(ready) >= replicas[role]
        selector = ",".join(f"{k}={v}" for k, v in builders.worker_selector(name, role).items())
        await kube.patch_status(API_VERSION, "ServingPool", namespace, f"{name}-{role}",
                                {"replicas": len(mine), "readyReplicas": len(ready), "selector": selector})
    router = await kube.get("apps/v1", "Deployment", namespace, f"{name}-router")
    router_ready = int(((router or {}).get("status") or {}).get("readyReplicas") or 0)
    all_ready = all_ready and router_ready >= spec.router.replicas
    waiting = ", ".join(f"{role} {text}" for role, text in summary.items()) + f", router {router_ready}/" \
        f"{spec.router.replicas}"
    conditions = set_condition(conditions, "Ready", all_ready, "AllReady" if all_ready else "Waiting",
                               f"ready: {waiting}", generation)
    conditions = set_condition(conditions, "Progressing", not all_ready,
                               "RollingOut" if not all_ready else "Stable", f"ready: {waiting}", generation)
    conditions = set_condition(conditions, "Degraded", False, "Reconciled", "", generation)
    status = {
        "observedGeneration": generation, "conditions": conditions, "pools": pool_status, "readySummary": summary,
        "endpoint": f"http://{name}.{namespace}.svc:{spec.router.service.port}/v1",
    }
    return Outcome(status, applied, all_ready)

