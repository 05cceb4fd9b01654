"""The role balancer's loop: snapshot -> policy -> at most one switch, executed before the next.

It wakes on every stats update (at least every `tick_s`), asks the `Balancer` for a decision,
publishes the policy's inputs as metrics, and executes a switch through an `Actuator`: the
worker's SetRole stops admitting, lets its in-flight work finish for up to `grace_s` (hands the rest
over: the router resumes those streams elsewhere), switches and rejoins. The loop waits for that
call, so one switch is in flight at a time whoever else watches the workers. On Kubernetes the
operator's actuator also writes the pod's `triphase.dev/current-role` label and an Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.common import labels, role_pb
from triphase.common.worker_stubs import WorkerStubs
from triphase.control.balancer import Balancer, Decision, Switch
from triphase.control.metrics import BalancerMetrics
from triphase.control.stats import StatsWatcher

logger = logging.getLogger(__name__)


class SwitchFailed(Exception):
    pass


class Actuator(Protocol):
    async def switch(self, endpoint: str, switch: Switch) -> None:
        """Move the worker at `endpoint` to `switch.to_role`; returns once it serves in it."""


class SetRoleActuator:
    """Switches a worker with its SetRole RPC."""

    def __init__(self, channels: WorkerStubs, grace_s: float = 5.0) -> None:
        self.channels = channels
        self.grace_s = grace_s

    async def switch(self, endpoint: str, switch: Switch) -> None:
        request = pb.SetRoleRequest(role=role_pb.TO_PB[switch.to_role], grace_seconds=self.grace_s)
        try:
            response = await self.channels.stub(endpoint).SetRole(request, timeout=self.grace_s + 60)
        except grpc.aio.AioRpcError as exc:
            raise SwitchFailed(f"SetRole on {endpoint}: {exc.code().name}: {exc.details()}") from None
        if response.current != role_pb.TO_PB[switch.to_role]:
            raise SwitchFailed(f"{endpoint} is still {response.current} after SetRole")
        if response.handed_over:
            logger.info("Worker %s handed %d streams over to switch", switch.worker_id, response.handed_over)


class BalancerLoop:
    def __init__(self, watcher: StatsWatcher, actuator: Actuator, balancer: Balancer, *,
                 deployment: str = labels.LOCAL_DEPLOYMENT, metrics: BalancerMetrics | None = None, tick_s: float = 0.5,
                 on_switch: Callable[[Switch, float], None] | None = None) -> None:
        self.watcher = watcher
        self.actuator = actuator
        self.balancer = balancer
        self.deployment = deployment
        self.metrics = metrics
        self.tick_s = tick_s
        self.on_switch = on_switch
        self.last: Decision | None = None
        self.completed = 0

    async def run(self) -> None:
        last_why = ""
        while True:
            self.watcher.changed.clear()
            workers = self.watcher.snapshot()
            decision = self.last = self.balancer.decide(workers, time.monotonic())
            model = next(iter(self.watcher.models.values()), "")
            if self.metrics is not None and model:  # no series before a worker has said what it serves
                self.metrics.observe(self.deployment, model, decision, workers)
            if decision.switch is not None:
                await self._execute(decision.switch, decision.why, model)
            elif decision.why != last_why:
                logger.debug("No switch: %s", decision.why)
            last_why = decision.why
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.watcher.changed.wait(), self.tick_s)

    async def _execute(self, switch: Switch, why: str, model: str) -> None:
        endpoint = self.watcher.endpoint_of(switch.worker_id)
        if endpoint is None:
            return
        started = time.monotonic()
        logger.info("Switching worker %s from %s to %s: %s", switch.worker_id, switch.from_role, switch.to_role, why)
        try:
            await self.actuator.switch(endpoint, switch)
        except SwitchFailed as exc:
            self.balancer.record(switch, time.monotonic())  # a failing worker is not retried at once
            logger.warning("Role switch of %s failed: %s", switch.worker_id, exc)
            if self.metrics is not None:
                self.metrics.failures.labels(self.deployment, model).inc()
            return
        self.balancer.record(switch, time.monotonic())  # settle and cooldown count from the new split
        seconds = time.monotonic() - started
        self.completed += 1
        logger.info("Worker %s is %s (switched in %.2f s)", switch.worker_id, switch.to_role, seconds)
        if self.metrics is not None:
            self.metrics.switched(self.deployment, model, switch, seconds)
        if self.on_switch is not None:
            self.on_switch(switch, seconds)
