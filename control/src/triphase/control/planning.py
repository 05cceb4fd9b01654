"""The planner's loop: every interval, read the signals and the pools, plan, apply, report.

The parts that differ between Kubernetes and one machine are behind two small interfaces: `Pools`
(what the pools ask for and have Ready, and how many workers serve each role now) and `Scaler`
(applies a plan: ServingPool replicas on Kubernetes, started or stopped processes locally). The
loop owns the order and the bookkeeping: signals that cannot be read become a hold, never a change;
metrics and the `report` callback see every interval's outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from triphase.common import labels
from triphase.common.roles import Role
from triphase.control.metrics import PlannerMetrics
from triphase.control.planner import Plan, Planner, PoolView, Signals
from triphase.control.signals import MetricsUnavailable

logger = logging.getLogger(__name__)


class Pools(Protocol):
    async def observe(self) -> tuple[dict[Role, PoolView], dict[Role, int]]:
        """The prefill and decode pools, and ready workers by the role they serve now."""


class Scaler(Protocol):
    async def scale(self, plan: Plan) -> None:
        """Give each pool of `plan.changes` its new replicas."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One interval: the plan, the signals it was made from (None: unreadable) and why they were not."""

    plan: Plan
    signals: Signals | None
    error: str = ""


class PlannerLoop:
    def __init__(self, planner: Planner, read: Callable[[], Awaitable[Signals]], pools: Pools, scaler: Scaler, *,
                 interval_s: float, deployment: str = labels.LOCAL_DEPLOYMENT, metrics: PlannerMetrics | None = None,
                 report: Callable[[Outcome], Awaitable[None]] | None = None) -> None:
        self.planner = planner
        self.read = read
        self.pools = pools
        self.scaler = scaler
        self.interval_s = interval_s
        self.deployment = deployment
        self.metrics = metrics
        self.report = report
        self.model = ""
        self.last: Outcome | None = None

    async def tick(self, now: float | None = None) -> Outcome:
        now = time.monotonic() if now is None else now
        error = ""
        signals: Signals | None
        try:
            signals = await self.read()
        except MetricsUnavailable as exc:
            signals, error = None, str(exc)
        pools, by_role = await self.pools.observe()
        plan = self.planner.plan(now, signals, pools, by_role)
        if plan.changes:
            await self.scaler.scale(plan)
            logger.info("%s: %s", self.deployment, plan.why)
        elif plan.held:
            logger.info("%s: holding (%s): %s", self.deployment, plan.held, error or plan.why)
        outcome = self.last = Outcome(plan, signals, error)
        self._observe(outcome)
        if self.report is not None:
            await self.report(outcome)
        return outcome

    def _observe(self, outcome: Outcome) -> None:
        m = self.metrics
        if m is None:
            return
        if outcome.signals is not None and outcome.signals.model:
            self.model = outcome.signals.model
        d, model = self.deployment, self.model
        m.metrics_up.labels(d, model).set(0.0 if outcome.error else 1.0)
        if outcome.error:
            m.metrics_errors.labels(d, model).inc()
        if outcome.plan.held:
            m.held.labels(d, model, outcome.plan.held).inc()
        for role, replicas in outcome.plan.replicas.items():
            m.desired.labels(d, model, str(role)).set(replicas)
        for role, demand in outcome.plan.demand.items():
            m.demand.labels(d, model, str(role)).set(demand)
        for change in outcome.plan.changes:
            direction = "up" if change.to_replicas > change.from_replicas else "down"
            m.decisions.labels(d, model, str(change.role), direction, change.reason).inc()
        if outcome.signals is not None and outcome.signals.attainment is not None:
            m.attainment.labels(d, model).set(outcome.signals.attainment)

    async def run(self, before_tick: Callable[[], Awaitable[None]] | None = None) -> None:
        """Tick every `interval_s`; `before_tick()` first each time (the operator re-reads the spec
        there, and may change the interval)."""
        while True:
            started = time.monotonic()
            try:
                if before_tick is not None:
                    await before_tick()
                await self.tick(started)
            except Exception:  # one bad interval (an API error) must not stop the loop
                logger.exception("%s: planner interval failed", self.deployment)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))  # the planner's period
