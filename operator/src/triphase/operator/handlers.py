"""The only module with kopf decorators: every event on a ServingDeployment (create, update, resume,
a periodic timer) and a change of a ServingPool's replicas runs the same reconcile; two daemons run the
control loops a spec asks for (the role balancer, the planner).

A spec that cannot be served (or a child's name taken by an object it does not own) becomes a Degraded
condition and a Warning event, and the handler stops retrying (kopf.PermanentError) until the spec
changes or the resync finds it fixed: never a crash loop. A failed API call is retried with backoff
(kopf.TemporaryError). No finalizer is put on a ServingDeployment (`_spawned_without_finalizers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import kopf

from triphase.operator import metrics, settings
from triphase.operator.api.v1alpha1 import GROUP, VERSION
from triphase.operator.balancing import DeploymentBalancer
from triphase.operator.kube import ApiError, Kube
from triphase.operator.planning import DeploymentPlanner
from triphase.operator.reconcile import InvalidSpec, reconcile

logger = logging.getLogger(__name__)
FINALIZER = f"{GROUP}/operator"
PEERING_CHECK_S = 5.0  # how often a missing peering object is looked for
PEERING_NAG_S = 60.0  # how often its absence is repeated in the log
RESYNC_SECONDS = settings.SETTINGS.resync_seconds  # `--resync-seconds`, set before this module is imported


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    # kopf's records (status.kopf) go with the status the reconcile writes anyway: one write per handled
    # change. In annotations they were a second write, of the object itself (and kopf brands an object
    # whose annotations it uses with one more).
    settings.persistence.progress_storage = kopf.StatusProgressStorage()
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage()
    # Events say what the operator did (posted explicitly below) and every warning; kopf's own
    # "handler succeeded" chatter stays in the log instead of costing API writes.
    settings.posting.level = logging.WARNING
    settings.peering.clusterwide = True
    settings.watching.server_timeout = 300
    settings.batching.batch_window = 0.02  # the reconcile is level-based: no need to wait for bursts to end
    from triphase.common.k8s.client import KubeAccess

    memo.kube = Kube(KubeAccess.load())
    memo.pool_replicas = {}  # ServingPool uid -> spec.replicas last seen (shared: the memo is copied shallowly)
    memo.locks = {}  # (namespace, name) -> asyncio.Lock: one reconcile of a ServingDeployment at a time
    memo.peering_watch = None
    if not settings.peering.standalone:
        memo.peering_watch = asyncio.create_task(say_while_peering_is_missing(memo.kube, settings.peering.name))


async def say_while_peering_is_missing(kube: Kube, name: str) -> None:
    """kopf waits silently for its ClusterKopfPeering and reconciles nothing meanwhile: say so, and how
    to fix it, until the object exists."""
    url = f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}"
    loop = asyncio.get_running_loop()
    said_at: float | None = None
    while True:
        try:
            await kube.request("GET", url)
        except ApiError as exc:
            if exc.status not in (403, 404):
                logger.warning("Could not look up ClusterKopfPeering %s: %s", name, exc)
            elif said_at is None or loop.time() - said_at >= PEERING_NAG_S:
                said_at = loop.time()
                logger.error("Waiting for ClusterKopfPeering %r (leader election) before reconciling anything: "
                             "apply deploy/manifests/ (kubectl apply -f deploy/manifests/), or run with --standalone "
                             "(a single replica, no election)", name)
        else:
            if said_at is not None:
                logger.info("ClusterKopfPeering %r found; reconciling", name)
            return
        await asyncio.sleep(PEERING_CHECK_S)  # polling for an object someone else must create


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    if memo.peering_watch is not None:
        memo.peering_watch.cancel()
    await memo.kube.close()


@contextlib.asynccontextmanager
async def _api_retries() -> AsyncIterator[None]:
    """A failed API call is not the spec's fault: retry the handler with backoff."""
    try:
        yield
    except ApiError as exc:
        raise kopf.TemporaryError(f"API server: {exc}", delay=5) from None


def _lock(memo: kopf.Memo, namespace: str, name: str) -> asyncio.Lock:
    """Change handlers, the resync timer and pool events run concurrently; reconciles of one object must
    not, or one with an older spec re-creates what a newer one just removed."""
    lock: asyncio.Lock = memo.locks.setdefault((namespace, name), asyncio.Lock())
    return lock


async def _run(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, *, reread: bool = False) -> None:
    meta = body["metadata"]
    try:
        async with _api_retries(), _lock(memo, meta["namespace"], meta["name"]):
            if reread:  # the timer's body may predate a change reconciled while it waited for the lock
                fresh = await memo.kube.get(f"{GROUP}/{VERSION}", "ServingDeployment", meta["namespace"], meta["name"])
                if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                    return
                body = kopf.Body(fresh)
            status = body.get("status") or {}
            outcome = await reconcile(memo.kube, dict(body))
    except InvalidSpec as exc:
        status = body.get("status") or {}
        already = status.get("observedGeneration") == body["metadata"].get("generation") and any(
            c.get("type") == "Degraded" and c.get("status") == "True" for c in status.get("conditions") or [])
        patch.status.update(exc.status)
        if not already:  # one Warning per bad generation, not one per resync
            kopf.warn(body, reason=exc.reason, message=str(exc))
        raise kopf.PermanentError(str(exc)) from None
    patch.status.update(outcome.status)
    generation = body["metadata"].get("generation")
    if status.get("observedGeneration") != generation:
        message = f"Applied {len(outcome.applied)} objects for generation {generation}"
        logger.info("%s: %s", body["metadata"]["name"], message)
        kopf.event(body, type="Normal", reason="Applied", message=message)


@kopf.on.resume(GROUP, VERSION, "servingdeployments")
@kopf.on.create(GROUP, VERSION, "servingdeployments")
@kopf.on.update(GROUP, VERSION, "servingdeployments", field="spec")
async def serving_deployment(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    await _run(body, patch, memo, logger)


@kopf.on.delete(GROUP, VERSION, "servingdeployments", optional=True)
async def deleted(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Optional: no finalizer holds a ServingDeployment, so deleting one (or its namespace) never waits
    for the operator; the children carry owner references and the garbage collector removes them. This
    only forgets the deployment's lock when the operator happens to see the deletion."""
    memo.locks.pop((body["metadata"]["namespace"], body["metadata"]["name"]), None)
    logger.info("Deleting %s: its pools, router and objects are garbage-collected", body["metadata"]["name"])


@kopf.timer(GROUP, VERSION, "servingdeployments", interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Level-based: correct drift and refresh status even when nothing announced a change."""
    with contextlib.suppress(kopf.PermanentError):  # already reported; waits for a spec change
        await _run(body, patch, memo, logger, reread=True)


@kopf.on.event(GROUP, VERSION, "servingpools")
async def pool_event(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """`kubectl scale servingpool/...` (or an HPA, or the planner): the pool's Deployment follows at once.

    A plain event handler that remembers the replicas it last saw per pool (in memory), so kopf writes
    nothing on the pools: a pool seen for the first time (created by a reconcile, or listed after a
    restart, when the ServingDeployment's resume reconcile covers it) is only remembered; a change of
    spec.replicas reconciles the parent."""
    meta = body["metadata"]
    spec = body.get("spec") or {}
    if event.get("type") == "DELETED":
        memo.pool_replicas.pop(meta["uid"], None)
        return
    before = memo.pool_replicas.get(meta["uid"])
    memo.pool_replicas[meta["uid"]] = spec.get("replicas")
    deployment = spec.get("deployment")
    if before is None or before == spec.get("replicas") or not deployment:
        return
    async with _api_retries(), _lock(memo, meta["namespace"], deployment):
        parent = await memo.kube.get(f"{GROUP}/{VERSION}", "ServingDeployment", meta["namespace"], deployment)
        if parent is None:
            return
        try:
            outcome = await reconcile(memo.kube, parent)
        except InvalidSpec:
            return  # the deployment's own handler reports it
        await memo.kube.patch_status(f"{GROUP}/{VERSION}", "ServingDeployment", meta["namespace"], deployment,
                                     outcome.status)
    message = f"Scaled to {spec.get('replicas')} replicas; the Deployment follows"
    logger.info(message)
    kopf.event(body, type="Normal", reason="Scaled", message=message)


def _role_switching(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("roleSwitching") or {}).get("enabled"))


@kopf.daemon(GROUP, VERSION, "servingdeployments", when=_role_switching, cancellation_timeout=10.0)
async def role_balancer(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The fast loop, for as long as spec.roleSwitching.enabled is true (kopf stops the daemon when the
    filter stops matching, the object goes, or this replica loses the leadership)."""
    def post(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    try:
        await DeploymentBalancer(memo.kube, body, metrics.BALANCER, post).run()
    except InvalidSpec as exc:  # reported by the reconcile; try again once the spec is fixed
        raise kopf.TemporaryError(f"not balancing roles: {exc}", delay=30) from None


def _autoscaling(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


@kopf.daemon(GROUP, VERSION, "servingdeployments", when=_autoscaling, cancellation_timeout=10.0)
async def planner(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The slow loop, for as long as spec.autoscaling.enabled is true: pool sizes from Prometheus."""
    def post(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    meta = body["metadata"]
    try:
        await DeploymentPlanner(memo.kube, body, metrics.PLANNER, post, _lock(memo, meta["namespace"],
                                                                            meta["name"])).run()
    except InvalidSpec as exc:  # reported by the reconcile; try again once the spec is fixed
        raise kopf.TemporaryError(f"not planning: {exc}", delay=30) from None


def _spawned_without_finalizers() -> None:
    """kopf puts a finalizer on every object that has a daemon or a timer, so that it can stop them before
    the object goes. Ours need no such wait (kopf cancels them when it sees the deletion, and they hold
    nothing the garbage collector does not remove), and a finalizer would hold a ServingDeployment, and the
    deletion of its namespace, for as long as the operator is down. kopf has no option for it: the resync
    timer and the daemons are registered again without it (and kopf then removes the finalizer from
    objects that carry it)."""
    spawning = kopf.get_default_registry()._spawning
    spawning._handlers[:] = [dataclasses.replace(h, requires_finalizer=False) for h in spawning._handlers]


_spawned_without_finalizers()
