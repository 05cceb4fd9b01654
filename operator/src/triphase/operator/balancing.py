"""The role balancer of one ServingDeployment, run by a kopf daemon while `spec.roleSwitching.enabled`
(no kopf import here: the daemon in handlers.py passes in how to post Events).

Leader election makes the operator the single writer of roles. Every DISCOVERY_S the worker pods are
listed (Running and Ready, endpoints read as the router reads them) and their stats watched; the
shared loop (triphase.control) decides and executes switches. After each switch the pod's
`triphase.dev/current-role` label is written, an Event is posted on the ServingDeployment and the
status is refreshed, so `status.pools[*].byRole` counts the new split. A label that disagrees with
the role a worker reports (a restarted container comes back in its pool's role) is corrected, so the
label, and the status computed from it, stays true. The SLO and limits are re-read from the live
spec on every discovery pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from triphase.common import labels
from triphase.common.k8s.pods import pod_endpoint
from triphase.common.security import mtls, pki
from triphase.common.worker_stubs import WorkerStubs
from triphase.control.balancer import Balancer, Settings, Slo, Switch
from triphase.control.loop import BalancerLoop, SetRoleActuator
from triphase.control.metrics import BalancerMetrics
from triphase.control.stats import StatsWatcher
from triphase.operator import security
from triphase.operator.api.v1alpha1 import API_VERSION, ServingDeploymentSpec
from triphase.operator.builders import workers_selector
from triphase.operator.daemon import DeploymentDaemon, PostEvent
from triphase.operator.kube import ApiError, Kube
from triphase.operator.reconcile import InvalidSpec, observe

logger = logging.getLogger(__name__)
DISCOVERY_S = 5.0

def policy(spec: ServingDeploymentSpec) -> tuple[Slo, Settings]:
    rs = spec.role_switching
    return Slo(spec.slo.ttft_seconds, spec.slo.tpot_seconds), Settings(
        max_switches_per_minute=rs.max_switches_per_minute, min_per_role=rs.min_per_role)


class _Actuator:
    """SetRole, then the pod label, the Event and the status."""

    def __init__(self, balancing: DeploymentBalancer, channels: WorkerStubs) -> None:
        self.balancing = balancing
        self.set_role = SetRoleActuator(channels)

    async def switch(self, endpoint: str, switch: Switch) -> None:
        started = time.monotonic()
        await self.set_role.switch(endpoint, switch)
        b = self.balancing
        pod = b.pods.get(endpoint, "")
        message = (f"Switched worker {pod or switch.worker_id} from {switch.from_role} to {switch.to_role} "
                   f"({switch.reason}) in {time.monotonic() - started:.1f} s")
        b.post("Normal", "RoleSwitched", message)
        logger.info("%s/%s: %s", b.namespace, b.name, message)
        try:
            if pod:
                b.switched_at[pod] = time.monotonic()
                await b.label(pod, str(switch.to_role))
            await b.refresh_status()
        except ApiError as exc:  # the switch stands; the next discovery pass and resync catch up
            logger.warning("%s: switched %s but could not label it or refresh the status: %s", b.deployment,
                           pod or switch.worker_id, exc)


class DeploymentBalancer(DeploymentDaemon):
    def __init__(self, kube: Kube, body: Any, metrics: BalancerMetrics | None, post: PostEvent) -> None:
        super().__init__(kube, body, post)
        self.metrics = metrics
        self.pods: dict[str, str] = {}  # endpoint -> pod name
        self.labelled: dict[str, str] = {}  # pod name -> its current-role label
        self.switched_at: dict[str, float] = {}  # pod name -> when a switch of it completed

    async def control_bundle(self) -> mtls.Bundle:
        """The operator's `control` certificate for this deployment's workers, from its CA Secret (which
        the reconcile makes: waited for)."""
        while True:
            secret = await self.kube.get("v1", "Secret", self.namespace, security.ca_secret_name(self.name))
            if secret is not None:
                return security.control_bundle(security.Authority.from_secret(secret))
            logger.info("%s: waiting for the deployment's CA Secret", self.deployment)
            await asyncio.sleep(DISCOVERY_S)  # the reconcile makes it; nothing announces it to this daemon

    async def renew(self, bundle: mtls.Bundle) -> None:
        if pki.renewal_due(bundle.files[mtls.CERT]):
            fresh = await self.control_bundle()
            bundle.replace(fresh.files)
            logger.info("%s: renewed the balancer's certificate", self.deployment)

    async def run(self) -> None:
        spec = self.live_spec()
        slo, settings = policy(spec)
        bundle = await self.control_bundle()
        channels = WorkerStubs(bundle)
        watcher = StatsWatcher(channels)
        balancer = Balancer(slo, settings)
        loop = BalancerLoop(watcher, _Actuator(self, channels), balancer, deployment=self.deployment,
                            metrics=self.metrics)
        task = asyncio.create_task(loop.run())
        logger.info("%s: role balancer started (TTFT %g s, TPOT %g s)", self.deployment, slo.ttft_s, slo.tpot_s)
        try:
            while not task.done():
                with contextlib.suppress(InvalidSpec):
                    balancer.slo, balancer.settings = policy(self.live_spec())
                try:
                    await self.renew(bundle)
                    await self.discover(watcher)
                    await self.correct_labels(watcher)
                except ApiError as exc:
                    logger.warning("%s: could not list or label worker pods: %s", self.deployment, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), DISCOVERY_S)
            task.result()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await watcher.stop()
            await channels.close()
            if self.metrics is not None:
                self.metrics.forget(self.deployment)
            logger.info("%s: role balancer stopped", self.deployment)

    async def discover(self, watcher: StatsWatcher) -> None:
        pods = await self.kube.list("v1", "Pod", self.namespace, workers_selector(self.name))
        self.pods = {ep: p["metadata"]["name"] for p in pods if (ep := pod_endpoint(p))}
        self.labelled = {p["metadata"]["name"]: (p["metadata"].get("labels") or {}).get(labels.CURRENT_ROLE, "")
                         for p in pods}
        watcher.set_endpoints(sorted(self.pods))

    async def correct_labels(self, watcher: StatsWatcher) -> None:
        """Label each pod with the role its worker reports, from a report newer than its last switch."""
        for endpoint, view in list(watcher.views.items()):
            pod = self.pods.get(endpoint)
            if pod is None or not view.healthy or view.switching or view.seen_at <= self.switched_at.get(pod, 0.0):
                continue
            if self.labelled.get(pod) != str(view.role):
                await self.label(pod, str(view.role))

    async def label(self, pod: str, role: str) -> None:
        try:
            await self.kube.patch_labels("v1", "Pod", self.namespace, pod, {labels.CURRENT_ROLE: role})
        except ApiError as exc:
            if exc.status != 404:  # a pod deleted meanwhile needs no label
                raise
        self.labelled[pod] = role

    async def refresh_status(self) -> None:
        """Recompute the status from the children (what a resync would do, now)."""
        body = await self.kube.get(API_VERSION, "ServingDeployment", self.namespace, self.name)
        if body is None:
            return
        with contextlib.suppress(InvalidSpec):
            outcome = await observe(self.kube, body)
            await self.kube.patch_status(API_VERSION, "ServingDeployment", self.namespace, self.name, outcome.status)
