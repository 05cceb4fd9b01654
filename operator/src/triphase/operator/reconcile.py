"""One idempotent, level-based reconcile of a ServingDeployment (no kopf import).

desired (from the spec and the ServingPools' replicas) -> server-side apply every child with an owner
reference -> observe the children -> status. Running it twice changes nothing; running it after a
crash half-way finishes the job; objects are named deterministically, so nothing is ever duplicated.
Deleting the ServingDeployment leaves cleanup to the garbage collector (owner references).

Only what it owns: before it applies over or deletes an object, the operator checks that the object
carries this ServingDeployment's owner reference, and pins the write to that object's uid, so an object
someone else made under a child's name is never taken over or removed (`NotOwned`: the deployment is
Degraded until the object is renamed or deleted). The mTLS Secrets (security.py) are made and renewed here
too.

Pools are counted by the role each worker pod reports (`triphase.dev/current-role`, written by the
role balancer, balancing.py, from what the worker itself reports), falling back to the role it was
created with; the reconcile never relabels pods, so it never fights a runtime role switch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from pydantic import ValidationError

from triphase.common import labels
from triphase.common.k8s.pods import pod_ready
from triphase.operator import builders, security, settings
from triphase.operator.api.v1alpha1 import API_VERSION, PoolSpec, ServingDeploymentSpec
from triphase.operator.conditions import set_condition
from triphase.operator.kube import FIELD_MANAGER, RESOURCES, ApiError, Kube

logger = logging.getLogger(__name__)
INITIAL_REPLICAS_MANAGER = "triphase-operator-initial-replicas"


class InvalidSpec(Exception):
    """The spec passed the CRD schema but cannot be served; the message names the field. `status`
    (Degraded and not Ready, with the reason) is what the caller should write back."""

    reason = "InvalidSpec"

    def __init__(self, message: str, status: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status or {}


class NotOwned(InvalidSpec):
    """A child's name is taken by an object this ServingDeployment does not own."""

    reason = "NotOwned"


def _owns(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return any(ref.get("uid") == owner["uid"] for ref in obj["metadata"].get("ownerReferences") or [])


class VerifiedUids:
    """The uid of every child a reconcile found owned by its ServingDeployment, so later reconciles
    apply it pinned to that uid without reading it first (a GET per child doubled the API calls).

    A uid is never reused, so the pin is the check: if the object was deleted and the name now holds
    another one, the API server refuses the pinned apply (422, the uid being immutable; 409 on a
    precondition) and the child is looked at again; if it
    was deleted and nothing took the name, the apply creates ours. Keyed by the owner's uid too: a
    ServingDeployment deleted and made again under its name starts from nothing."""

    LIMIT = 50_000  # entries; beyond it (deployments long gone) the cache starts over

    def __init__(self) -> None:
        self._uids: dict[tuple[str, ...], str] = {}

    @staticmethod
    def key(obj: dict[str, Any], owner: dict[str, Any]) -> tuple[str, ...]:
        meta = obj["metadata"]
        return owner["uid"], obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]

    def get(self, key: tuple[str, ...]) -> str | None:
        return self._uids.get(key)

    def remember(self, key: tuple[str, ...], uid: str) -> None:
        if len(self._uids) >= self.LIMIT:
            self._uids.clear()
        self._uids[key] = uid

    def forget(self, key: tuple[str, ...]) -> None:
        self._uids.pop(key, None)


VERIFIED = VerifiedUids()

# A server-side apply carrying this resourceVersion can only create: no stored object has it, so over
# an existing object (ours or not) the API server answers 409 and writes nothing, while an absent one
# is created with the operator as its apply manager. (A POST would record the operator as an Update
# manager, which keeps owning the fields that later applies drop, so they would never be removed.)
CREATE_ONLY = str(2**64 - 1)


async def _apply_owned(kube: Kube, obj: dict[str, Any], owner: dict[str, Any], *, absent: bool = False
                       ) -> dict[str, Any]:
    """Server-side apply a child, unless its name holds an object owned by someone else (NotOwned); an
    update is pinned to the uid that was checked (now, or by an earlier reconcile: VerifiedUids).
    `absent`: the name most likely holds nothing yet (a new deployment's child), so the child is created
    without a look first, and looked at only when something is there."""
    meta = obj["metadata"]
    key = VerifiedUids.key(obj, owner)
    known = VERIFIED.get(key)
    pin = {"uid": known} if known is not None else {"resourceVersion": CREATE_ONLY} if absent else None
    if pin is not None:
        try:
            applied = await kube.apply(_owned({**obj, "metadata": {**meta, **pin}}, owner))
        except ApiError as exc:
            if exc.status not in (409, 422):  # 409: something is there (CREATE_ONLY) or nothing is (a uid);
                raise                         # 422 "metadata.uid: field is immutable": another object holds
            VERIFIED.forget(key)              # the name now. Look at it below.
        else:
            VERIFIED.remember(key, applied["metadata"]["uid"])
            return applied
    existing = await kube.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
    if existing is not None:
        if not _owns(existing, owner):
            raise NotOwned(f"{obj['kind']} {meta['name']} exists and is not owned by ServingDeployment "
                           f"{owner['name']}: rename or delete it")
        meta["uid"] = existing["metadata"]["uid"]
    applied = await kube.apply(_owned(obj, owner))
    VERIFIED.remember(key, applied["metadata"]["uid"])
    return applied


async def _delete_owned(kube: Kube, api_version: str, kind: str, namespace: str, name: str,
                        owner: dict[str, Any]) -> bool:
    existing = await kube.get(api_version, kind, namespace, name)
    if existing is None:
        return False
    if not _owns(existing, owner):
        logger.warning("Not deleting %s %s/%s: it is not owned by %s", kind, namespace, name, owner["name"])
        return False
    return await kube.delete(api_version, kind, namespace, name, uid=existing["metadata"]["uid"])


async def ensure_mtls(kube: Kube, name: str, namespace: str, owner: dict[str, Any], *, new: bool = False
                      ) -> security.Authority:
    """The deployment's CA (made once), and component Secrets with good certificates (renewed here).
    `new`: a deployment never reconciled before, so the CA is made without a look first."""
    ca_name = security.ca_secret_name(name)
    found = None if new else await kube.get("v1", "Secret", namespace, ca_name)
    made = False
    if found is None:
        created = await kube.create(
            _owned(security.ca_secret(name, namespace, security.Authority.new(name)), owner), FIELD_MANAGER)
        made = created is not None
        found = created or await kube.get("v1", "Secret", namespace, ca_name)  # None: created and deleted since
        if found is None:
            raise ApiError(409, f"Secret {ca_name} could not be created or read")
        if made:
            logger.info("%s/%s: made the deployment's CA", namespace, name)
    if not _owns(found, owner):
        raise NotOwned(f"Secret {ca_name} exists and is not owned by ServingDeployment {name}: rename or delete it")
    authority = security.Authority.from_secret(found)
    for identity in security.SECRETS:
        if made:  # certificates of a CA made just now cannot exist: issue them
            await _apply_owned(kube, security.bundle_secret(name, namespace, identity, authority), owner, absent=True)
            continue
        bundle_name = security.bundle_secret_name(name, identity)
        existing = await kube.get("v1", "Secret", namespace, bundle_name)
        if existing is not None and not _owns(existing, owner):
            raise NotOwned(f"Secret {bundle_name} exists and is not owned by ServingDeployment {name}: rename or "
                           f"delete it")
        reason = security.reissue_reason(existing, authority)
        if reason is not None:  # only now a certificate is issued (a key made and signed)
            bundle = security.bundle_secret(name, namespace, identity, authority)
            if existing is not None:  # checked just now: the apply is pinned to it
                VERIFIED.remember(VerifiedUids.key(bundle, owner), existing["metadata"]["uid"])
            await _apply_owned(kube, bundle, owner, absent=existing is None)
            logger.info("%s/%s: issued the %s certificate (%s)", namespace, name, identity.value, reason)
    return authority


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


async def _pool(kube: Kube, name: str, namespace: str, role: str, pool: PoolSpec, owner: dict[str, Any],
                existing: dict[str, Any] | None) -> dict[str, Any]:
    """Apply one ServingPool and return it. The initial replicas are written once, at creation, by a
    separate field manager: our applies never carry spec.replicas, so server-side apply never resets
    what /scale (or the planner) set since."""
    if existing is None:
        created = await kube.create(_owned(builders.serving_pool(name, namespace, role, pool, with_replicas=True),
                                           owner), INITIAL_REPLICAS_MANAGER)
        if created is not None:
            return created
    return await _apply_owned(kube, builders.serving_pool(name, namespace, role, pool, with_replicas=False), owner)


async def _remove_pool(kube: Kube, namespace: str, pool: str, owner: dict[str, Any]) -> None:
    """A pool removed from the spec: its Deployment and budget first, the ServingPool (which is how the
    next reconcile knows there is something to remove) last."""
    for api_version, kind in (("apps/v1", "Deployment"), ("policy/v1", "PodDisruptionBudget"),
                              (API_VERSION, "ServingPool")):
        if await _delete_owned(kube, api_version, kind, namespace, pool, owner):
            logger.info("Deleted %s %s (pool removed)", kind, pool)


async def reconcile(kube: Kube, body: dict[str, Any]) -> Outcome:
    generation = body["metadata"].get("generation")
    conditions = list((body.get("status") or {}).get("conditions") or [])
    try:
        return await _reconcile(kube, body)
    except InvalidSpec as exc:
        conditions = set_condition(conditions, "Degraded", True, exc.reason, str(exc), generation)
        conditions = set_condition(conditions, "Ready", False, exc.reason, str(exc), generation)
        raise type(exc)(str(exc), {"observedGeneration": generation, "conditions": conditions}) from None


async def _owned_pools(kube: Kube, name: str, namespace: str, owner: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The deployment's ServingPools by role (only ours: a label is no claim)."""
    return {p["metadata"]["labels"].get(labels.ROLE): p
            for p in await kube.list(API_VERSION, "ServingPool", namespace, f"{labels.DEPLOYMENT}={name}")
            if _owns(p, owner)}


async def _reconcile(kube: Kube, body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = parse(body.get("spec") or {})
    owner = owner_reference(body)
    wanted = builders.pools(spec)
    # Never reconciled: its children are made without looking for them first (each write is
    # create-only, and only a name found taken is looked at). Nothing of it can be left to remove but
    # what a reconcile cut short made; the resync, which takes the full path, removes that.
    new = not (body.get("status") or {}).get("observedGeneration")
    existing = {} if new else await _owned_pools(kube, name, namespace, owner)
    # A pool's Deployment counts too: one left behind without its ServingPool (an interrupted removal)
    # would otherwise never be removed, its owner being alive. Only ours: a label is no claim.
    workers = builders.workers_selector(name)
    deployed = set() if new else {d["metadata"]["labels"].get(labels.ROLE)
                                  for d in await kube.list("apps/v1", "Deployment", namespace, workers)
                                  if _owns(d, owner)}
    removed = (set(existing) | deployed) - set(wanted)
    applied_pools, _ = await asyncio.gather(  # wanted pools applied while removed ones go, all at once
        asyncio.gather(*(_pool(kube, name, namespace, role, pool, owner, existing.get(role))
                         for role, pool in wanted.items())),
        asyncio.gather(*(_remove_pool(kube, namespace, f"{name}-{role}", owner) for role in sorted(removed) if role)))
    pools = dict(zip(wanted, applied_pools, strict=True))
    replicas = {role: int(pool["spec"].get("replicas", wanted[role].replicas)) for role, pool in pools.items()}

    served = await kube.api_resources("monitoring.coreos.com/v1")
    monitoring = {kind for kind, (plural, _) in RESOURCES.items() if plural in served}
    await ensure_mtls(kube, name, namespace, owner, new=new)  # before the pods that mount it
    objects = builders.children(name, namespace, spec, replicas, monitoring=monitoring,
                                monitoring_labels=settings.monitoring_labels(),
                                router_role=settings.SETTINGS.router_cluster_role,
                                operator_namespace=settings.SETTINGS.operator_namespace)
    results = await asyncio.gather(*(_apply_owned(kube, obj, owner, absent=new) for obj in objects))  # one wave
    router = next(result for obj, result in zip(objects, results, strict=True)
                  if obj["kind"] == "Deployment" and obj["metadata"]["name"] == f"{name}-router")
    applied = [f"ServingPool/{name}-{role}" for role in pools] + [f"{o['kind']}/{o['metadata']['name']}"
                                                                   for o in objects]
    return await _observe(kube, body, spec, pools, replicas, router, applied, new=new)


async def observe(kube: Kube, body: dict[str, Any]) -> Outcome:
    """The status from the children as they are, applying nothing (the role balancer's refresh after it
    relabelled pods: a whole reconcile applied every child again and checked the mTLS Secrets)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = parse(body.get("spec") or {})
    owner = owner_reference(body)
    wanted = builders.pools(spec)
    pools = {role: pool for role, pool in (await _owned_pools(kube, name, namespace, owner)).items() if role in wanted}
    replicas = {role: int(pool["spec"].get("replicas", wanted[role].replicas)) for role, pool in pools.items()}
    router = await kube.get("apps/v1", "Deployment", namespace, f"{name}-router") or {}
    return await _observe(kube, body, spec, pools, replicas, router, [])


async def _observe(kube: Kube, body: dict[str, Any], spec: ServingDeploymentSpec, pools: dict[str, dict[str, Any]],
                   replicas: dict[str, int], router: dict[str, Any], applied: list[str], *, new: bool = False
                   ) -> Outcome:
    """The status. `new`: the pools' Deployments were made just now, so none of their pods is ready
    yet and the pods are not listed (one left by a reconcile cut short is counted at the resync)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    previous = body.get("status") or {}
    conditions = list(previous.get("conditions") or [])
    # an observation speaks for the generation last reconciled, not for a newer one it has not applied
    generation = meta.get("generation") if applied else previous.get("observedGeneration")
    workers = builders.workers_selector(name)
    pods = [] if new else await kube.list("v1", "Pod", namespace, workers)
    pool_status: dict[str, Any] = {}
    summary: dict[str, str] = {}
    all_ready = True
    updates = []
    for role, pool in pools.items():
        mine = [p for p in pods if p["metadata"].get("labels", {}).get(labels.ROLE) == role]
        ready = [p for p in mine if pod_ready(p)]
        by_role: dict[str, int] = {}
        for pod in ready:
            current = pod["metadata"].get("labels", {}).get(labels.CURRENT_ROLE) or role
            by_role[current] = by_role.get(current, 0) + 1
        pool_status[role] = {"desired": replicas[role], "ready": len(ready), "byRole": by_role}
        summary[role] = f"{len(ready)}/{replicas[role]}"
        all_ready = all_ready and len(ready) >= replicas[role]
        observed = {"replicas": len(mine), "readyReplicas": len(ready)}
        # only what changed is written (a new pool's counts are 0, as an absent status reads)
        if {k: (pool.get("status") or {}).get(k, 0) for k in observed} != observed:
            updates.append(kube.patch_status(API_VERSION, "ServingPool", namespace, f"{name}-{role}", observed))
    await asyncio.gather(*updates)
    router_ready = int((router.get("status") or {}).get("readyReplicas") or 0)
    all_ready = all_ready and router_ready >= spec.router.replicas
    waiting = ", ".join(f"{role} {text}" for role, text in summary.items()) + f", router {router_ready}/" \
        f"{spec.router.replicas}"
    conditions = set_condition(conditions, "Ready", all_ready, "AllReady" if all_ready else "Waiting",
                               f"ready: {waiting}", generation)
    conditions = set_condition(conditions, "Progressing", not all_ready,
                               "RollingOut" if not all_ready else "Stable", f"ready: {waiting}", generation)
    if applied:  # an observation leaves what the last reconcile found (a NotOwned clash, say)
        conditions = set_condition(conditions, "Degraded", False, "Reconciled", "", generation)
    status = {
        "observedGeneration": generation, "conditions": conditions, "pools": pool_status, "readySummary": summary,
        "endpoint": f"http://{name}.{namespace}.svc:{spec.router.service.port}/v1",
    }
    return Outcome(status, applied, all_ready)

