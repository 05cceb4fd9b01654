"""The role balancer and the planner as running things, for the runtimes outside Kubernetes:
`triphase balancer` (which `triphase up --role-switching` starts), the Ray application's control
replica, and `triphase up --autoscale`'s planner thread. The operator runs the same loops per
ServingDeployment with its own actuator and pools (operator/balancing.py, operator/planning.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable

from triphase.common.security import mtls
from triphase.common.worker_stubs import WorkerStubs
from triphase.control.balancer import Balancer, Settings, Slo
from triphase.control.loop import BalancerLoop, SetRoleActuator
from triphase.control.metrics import BalancerMetrics, PlannerMetrics
from triphase.control.planner import Planner, Signals
from triphase.control.planning import PlannerLoop, Pools, Scaler
from triphase.control.stats import StatsWatcher


@dataclasses.dataclass
class RunningBalancer:
    watcher: StatsWatcher
    channels: WorkerStubs
    loop: BalancerLoop
    task: asyncio.Task[None]

    def set_endpoints(self, endpoints: list[str]) -> None:
        """The workers to balance (the caller's discovery: a list, a file, the Ray directory)."""
        self.watcher.set_endpoints(endpoints)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.watcher.stop()
        await self.channels.close()


def start_balancer(slo: Slo, settings: Settings, grace_s: float, bundle: mtls.Bundle | None,
                   metrics: BalancerMetrics | None = None) -> RunningBalancer:
    """The balancer loop as a task of the running event loop, switching workers with SetRole over mTLS
    with `bundle` (a `control` certificate) when there is one."""
    channels = WorkerStubs(bundle)
    watcher = StatsWatcher(channels)
    loop = BalancerLoop(watcher, SetRoleActuator(channels, grace_s), Balancer(slo, settings), metrics=metrics)
    return RunningBalancer(watcher, channels, loop, asyncio.create_task(loop.run()))


def start_planner(planner: Planner, read: Callable[[], Signals], pools: Pools, scaler: Scaler, interval_s: float,
                  metrics: PlannerMetrics | None = None) -> threading.Thread:
    """The planner loop on an event loop in a daemon thread (it ends with the process); `read` blocks
    (a Prometheus query), so it runs off that loop."""

    async def signals() -> Signals:
        return await asyncio.to_thread(read)

    loop = PlannerLoop(planner, signals, pools, scaler, interval_s=interval_s, metrics=metrics)
    thread = threading.Thread(target=lambda: asyncio.run(loop.run()), name="planner", daemon=True)
    thread.start()
    return thread
