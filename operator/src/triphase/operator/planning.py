"""The planner of one ServingDeployment, run by a kopf daemon while `spec.autoscaling.enabled` (no kopf
import here: the daemon in handlers.py passes in how to post Events and the deployment's lock).

Every `intervalSeconds` the shared loop (triphase.control.planning) reads the deployment's signals from
`autoscaling.prometheusUrl` (series selected by `namespace` and `triphase_dev_deployment`, the labels the
PodMonitor puts on them) and its pools from the API server, and this module applies what it decides:

- a change is a PATCH of the ServingPool's /scale subresource (the same contract `kubectl scale` uses;
  the pool's event handler makes its Deployment follow), an Event `Scaled` on the ServingDeployment,
  and `status.lastScalingDecision`;
- every interval sets the `SLOMet` condition: True when the share of requests that met both targets
  over the last interval reaches `slo.attainmentTarget`, False when not, Unknown without traffic or
  without metrics (reason `MetricsUnavailable`, with a Warning Event once per outage and `Normal
  MetricsAvailable` when they return).

The spec is re-read every interval, so a change of SLO, bounds or Prometheus URL applies at the next one;
so is `autoscaling.profileConfigMap` (capacity from a `triphase profile`: decode step times instead of a
fit to what the workers report, a prefill rate until Prometheus has measured one; an Event each time
what is in use changes, a Warning while it cannot be used).
An encode pool is planned too, by its image throughput (images arriving and queued times the seconds
one takes), within its bounds: without `maxReplicas` it keeps its replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from triphase.common import labels
from triphase.common.k8s.pods import pod_ready
from triphase.common.profile import Profile
from triphase.common.roles import Role
from triphase.control.balancer import Slo
from triphase.control.metrics import PlannerMetrics
from triphase.control.planner import Plan, Planner, PoolView, Settings, StepModel
from triphase.control.planning import Outcome, PlannerLoop
from triphase.control.signals import PrometheusSignals, http_query
from triphase.operator.api.v1alpha1 import API_VERSION, PoolSpec, ServingDeploymentSpec
from triphase.operator.builders import workers_selector
from triphase.operator.conditions import now, set_condition
from triphase.operator.daemon import DeploymentDaemon, PostEvent
from triphase.operator.kube import ApiError, Kube
from triphase.operator.reconcile import InvalidSpec

logger = logging.getLogger(__name__)
PLANNED = (Role.PREFILL, Role.DECODE, Role.ENCODE)
SLO_MET = "SLOMet"
PROFILE_KEY = "profile.json"  # in the ConfigMap autoscaling.profileConfigMap names

def settings(spec: ServingDeploymentSpec) -> tuple[Slo, Settings]:
    return Slo(spec.slo.ttft_seconds, spec.slo.tpot_seconds), Settings(
        stabilization_s=float(spec.autoscaling.stabilization_seconds), role_switching=spec.role_switching.enabled)


def bounds(pool: PoolSpec) -> tuple[int, int]:
    """[min, max] of a pool: unset minReplicas is 1 (0 for a pool created empty); unset max (the API server
    requires it with autoscaling) is its replicas."""
    low = pool.min_replicas if pool.min_replicas is not None else min(1, pool.replicas)
    high = pool.max_replicas if pool.max_replicas is not None else max(pool.replicas, low)
    return low, high


def slo_condition(outcome: Outcome, spec: ServingDeploymentSpec) -> tuple[bool | None, str, str]:
    """(status, reason, message) of SLOMet for one interval."""
    if outcome.signals is None:
        return None, "MetricsUnavailable", outcome.error or "no metrics"
    s = outcome.signals
    if s.attainment is None:
        return None, "NoTraffic", "no requests finished in the last interval"
    target = spec.slo.attainment_target
    pct = f"p{spec.slo.percentile:g}"
    measured = (f"TTFT {pct} {_seconds(s.ttft_s)} (target {spec.slo.ttft_seconds:g} s), TPOT {pct} "
                f"{_seconds(s.tpot_s)} (target {spec.slo.tpot_seconds:g} s)")
    met = s.attainment >= target
    return met, "TargetMet" if met else "TargetMissed", (
        f"{s.attainment:.1%} of requests met both targets (at least; target {target:.0%}) over the last "
        f"{spec.autoscaling.interval_seconds} s; {measured}")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} s"


class DeploymentPlanner(DeploymentDaemon):
    def __init__(self, kube: Kube, body: Any, metrics: PlannerMetrics | None, post: PostEvent,
                 lock: asyncio.Lock | None = None) -> None:
        super().__init__(kube, body, post)
        self.metrics = metrics
        self.lock = lock or asyncio.Lock()
        self.spec = self.live_spec()
        self.metrics_down = False
        self.profile_said: str | None = None  # what the last profile Event said (one per change)

    def _reader(self, spec: ServingDeploymentSpec) -> PrometheusSignals:
        selector = f'namespace="{self.namespace}",{labels.PROMETHEUS_DEPLOYMENT}="{self.name}"'
        slo, _ = settings(spec)
        return PrometheusSignals(http_query(spec.autoscaling.prometheus_url or ""), selector, slo,
                                 spec.slo.percentile, spec.autoscaling.interval_seconds)

    async def run(self) -> None:
        slo, policy = settings(self.spec)
        planner = Planner(slo, policy)
        reader = self._reader(self.spec)

        async def read() -> Any:
            return await asyncio.to_thread(reader.read)

        loop = PlannerLoop(planner, read, self, self, interval_s=self.spec.autoscaling.interval_seconds,
                           deployment=self.deployment, metrics=self.metrics, report=self.report)
        logger.info("%s: planner started (every %d s, Prometheus %s)", self.deployment,
                    self.spec.autoscaling.interval_seconds, self.spec.autoscaling.prometheus_url)
        async def refresh() -> None:  # the latest spec (and profile) for this interval
            nonlocal reader
            with contextlib.suppress(InvalidSpec):  # the reconcile reports an invalid spec
                self.spec = self.live_spec()
                planner.slo, new = settings(self.spec)
                planner.settings = dataclasses.replace(planner.settings, stabilization_s=new.stabilization_s,
                                                       role_switching=new.role_switching)
                reader = self._reader(self.spec)
                loop.interval_s = self.spec.autoscaling.interval_seconds
            planner.use_profile(await self.profile(planner.slo))

        try:
            await loop.run(before_tick=refresh)
        finally:
            if self.metrics is not None:
                self.metrics.forget(self.deployment)
            logger.info("%s: planner stopped", self.deployment)

    # ---- Profile
    async def profile(self, slo: Slo) -> Profile | None:
        """The profile `autoscaling.profileConfigMap` names (None: capacity from what the workers report),
        with an Event whenever what is in use changes."""
        name = self.spec.autoscaling.profile_config_map
        if not name:
            self._say_profile(None)
            return None
        try:
            found = await self.kube.get("v1", "ConfigMap", self.namespace, name)
        except ApiError as exc:  # forbidden, say: the interval goes on with the fitted model
            found, read_error = None, f"ConfigMap {name} could not be read ({exc})"
        else:
            read_error = f"ConfigMap {name} not found"
        text = ((found or {}).get("data") or {}).get(PROFILE_KEY)
        try:
            if found is None:
                raise ValueError(read_error)
            if text is None:
                raise ValueError(f"ConfigMap {name} has no key {PROFILE_KEY}")
            profile = Profile.parse(text, f"ConfigMap {name} key {PROFILE_KEY}")
        except ValueError as exc:
            self._say_profile(f"{exc}; capacity comes from what the workers report", warning=True)
            return None
        streams = StepModel.from_profile(profile).streams_within(slo.tpot_s)
        self._say_profile(f"Capacity from ConfigMap {name} ({profile.model or 'a profile'}, engine "
                          f"{profile.engine or 'unnamed'}): {streams:.1f} decode streams per worker at the "
                          f"{slo.tpot_s:g} s TPOT target; {profile.prefill_tokens_per_s():.0f} prompt tokens/s "
                          "per prefill worker until one is measured")
        return profile

    def _say_profile(self, message: str | None, *, warning: bool = False) -> None:
        if message is not None and message != self.profile_said:
            self.post("Warning" if warning else "Normal", "ProfileUnusable" if warning else "ProfileLoaded", message)
            logger.info("%s: %s", self.deployment, message)
        self.profile_said = message

    # ---- Pools
    async def observe(self) -> tuple[dict[Role, PoolView], dict[Role, int]]:
        selector = f"{labels.DEPLOYMENT}={self.name}"
        pools = {p["metadata"]["labels"].get(labels.ROLE): p
                 for p in await self.kube.list(API_VERSION, "ServingPool", self.namespace, selector)}
        pods = [p for p in await self.kube.list("v1", "Pod", self.namespace, workers_selector(self.name))
                if pod_ready(p)]
        views: dict[Role, PoolView] = {}
        by_role = {role: 0 for role in PLANNED}
        for pod in pods:
            pod_labels = pod["metadata"].get("labels") or {}
            current = pod_labels.get(labels.CURRENT_ROLE) or pod_labels.get(labels.ROLE, "")
            if current in by_role:
                by_role[Role(current)] += 1
        for role in PLANNED:
            spec_pool = getattr(self.spec.pools, str(role))
            pool = pools.get(str(role))
            if spec_pool is None or pool is None:
                continue
            low, high = bounds(spec_pool)
            ready = sum(1 for p in pods if (p["metadata"].get("labels") or {}).get(labels.ROLE) == str(role))
            views[role] = PoolView(role, int(pool["spec"].get("replicas", spec_pool.replicas)), ready, low, high)
        return views, by_role

    # ---- Scaler
    async def scale(self, plan: Plan) -> None:
        for change in plan.changes:
            name = f"{self.name}-{change.role}"
            url = f"/apis/{API_VERSION}/namespaces/{self.namespace}/servingpools/{name}/scale"
            await self.kube.request("PATCH", url, {"spec": {"replicas": change.to_replicas}},
                                    content_type="application/merge-patch+json")
            demand = plan.demand.get(change.role)
            forecast = f"; forecast demand {demand:.2f} workers" if demand is not None else ""
            message = (f"Scaled pool {change.role} from {change.from_replicas} to {change.to_replicas} replicas "
                       f"({change.reason}{forecast})")
            self.post("Normal", "Scaled", message)
            logger.info("%s: %s", self.deployment, message)

    async def report(self, outcome: Outcome) -> None:
        """SLOMet every interval; lastScalingDecision when something changed; an Event when Prometheus
        goes away or comes back."""
        if outcome.error and not self.metrics_down:
            self.post("Warning", "MetricsUnavailable", f"Planner holds the pools: {outcome.error}")
        elif not outcome.error and self.metrics_down:
            self.post("Normal", "MetricsAvailable", "Prometheus answers again; planning resumed")
        self.metrics_down = bool(outcome.error)
        status, reason, message = slo_condition(outcome, self.spec)
        async with self.lock:  # the reconcile writes conditions too
            body = await self.kube.get(API_VERSION, "ServingDeployment", self.namespace, self.name)
            if body is None:
                return
            current = body.get("status") or {}
            patch: dict[str, Any] = {"conditions": set_condition(list(current.get("conditions") or []), SLO_MET,
                                                                 status, reason, message,
                                                                 body["metadata"].get("generation"))}
            if outcome.plan.changes:
                change = max(outcome.plan.changes, key=lambda c: abs(c.to_replicas - c.from_replicas))
                patch["lastScalingDecision"] = {"time": now(), "pool": str(change.role),
                                                "fromReplicas": change.from_replicas, "toReplicas": change.to_replicas,
                                                "reason": outcome.plan.why}
            await self.kube.patch_status(API_VERSION, "ServingDeployment", self.namespace, self.name, patch)
