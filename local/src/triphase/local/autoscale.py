"""`triphase up --autoscale`: the planner on one machine, starting and stopping worker processes.

The same policy and loop as on Kubernetes (triphase.control.planner / .planning), with local parts:
- signals from the Prometheus `triphase up` starts (every series; one deployment per machine);
- `LocalPools.observe`: a pool's replicas are its worker processes, starting or serving; Ready are
  those serving (their ready file written and their endpoint published); the split by current role
  is what the workers report to Prometheus;
- `LocalPools.scale` queues the plan; the supervisor's thread applies it on its next pass (`apply`):
  new workers are spawned and published once ready, in the workers file the router and the role
  balancer follow and the target file Prometheus scrapes from; a worker to remove (the newest of its
  pool) is unpublished first, then SIGTERMed, so it drains what it runs and takes nothing new.

The planner runs on an event loop in a thread of its own; the supervisor (which restarts crashed
workers) stays the only one touching processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import pathlib
import queue
import threading
from collections.abc import Callable

from triphase.common.process import endpoints_file
from triphase.common.process.net import free_port
from triphase.common.roles import Role
from triphase.control import runner
from triphase.control.metrics import PlannerMetrics
from triphase.control.planner import Plan, Planner, PoolView
from triphase.control.signals import MetricsUnavailable, PrometheusSignals
from triphase.local import prometheus
from triphase.local.supervisor import Child, Supervisor

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LocalWorker:
    name: str
    role: Role  # its pool
    child: Child
    metrics_port: int
    number: int  # in start order within its pool: the newest goes first
    endpoint: str | None = None  # set once ready (published)


@dataclasses.dataclass(frozen=True)
class Bounds:
    low: int
    high: int


class LocalPools:
    """Worker processes by pool; `spawn_args(role, metrics_port)` is a worker's command line."""

    def __init__(self, stack: Supervisor, spawn_args: Callable[[Role, int], list[str]], bounds: dict[Role, Bounds],
                 workers_file: pathlib.Path, targets_file: pathlib.Path, say: Callable[[str], None]) -> None:
        self.stack = stack
        self.spawn_args = spawn_args
        self.bounds = bounds
        self.workers_file = workers_file
        self.targets_file = targets_file
        self.say = say
        self.workers: dict[str, LocalWorker] = {}
        self.plans: queue.Queue[Plan] = queue.Queue()
        self.lock = threading.Lock()  # workers: read by the planner's thread, changed by the supervisor's
        self.reader: PrometheusSignals | None = None  # for the split by current role
        self.numbers = {role: itertools.count() for role in bounds}
        self.fixed_endpoints: list[str] = []  # workers outside the planned pools (encode), always listed
        self.fixed_targets: list[str] = []  # and their metrics

    # ---- the supervisor's thread
    def add(self, role: Role) -> LocalWorker:
        """Start a worker of `role`; it is published once its ready file says where it serves."""
        number = next(self.numbers[role])
        metrics_port = free_port()
        child = self.stack.spawn(f"{role}-{number}", self.spawn_args(role, metrics_port))
        worker = LocalWorker(child.name, role, child, metrics_port, number)
        with self.lock:
            self.workers[worker.name] = worker
        return worker

    def publish(self) -> None:
        with self.lock:
            ready = [w for w in self.workers.values() if w.endpoint]
        endpoints_file.write_endpoints(self.workers_file,
                                       [*self.fixed_endpoints, *(w.endpoint for w in ready if w.endpoint)])
        prometheus.write_targets(self.targets_file, [*self.fixed_targets, *(f"127.0.0.1:{w.metrics_port}"
                                                                             for w in self.workers.values())],
                                 prometheus.LOCAL_LABELS)

    def apply(self) -> None:
        """Run on every supervisor pass: publish workers that became ready, carry out queued plans."""
        changed = False
        for worker in list(self.workers.values()):
            if worker.endpoint is None:
                ready = self.stack.ready_file(worker.child)
                if ready.exists() and ready.read_text():
                    worker.endpoint = f"127.0.0.1:{int(ready.read_text())}"
                    worker.child.port = int(ready.read_text())
                    self.say(f"{worker.name} ready on {worker.endpoint}")
                    changed = True
        while True:
            try:
                plan = self.plans.get_nowait()
            except queue.Empty:
                break
            for change in plan.changes:
                mine = [w for w in self.workers.values() if w.role is change.role]
                for _ in range(change.to_replicas - len(mine)):
                    worker = self.add(change.role)
                    self.say(f"planner: starting {worker.name} ({change.reason})")
                    changed = True
                for worker in sorted(mine, key=lambda w: -w.number)[:max(0, len(mine) - change.to_replicas)]:
                    with self.lock:
                        del self.workers[worker.name]
                    self.publish()  # unpublished before it is stopped: no new work reaches it
                    self.stack.retire(worker.name)
                    self.say(f"planner: stopping {worker.name} ({change.reason}); it drains first")
        if changed:
            self.publish()

    # ---- the planner's thread (control.planning.Pools and Scaler)
    async def observe(self) -> tuple[dict[Role, PoolView], dict[Role, int]]:
        with self.lock:
            workers = list(self.workers.values())
        views = {role: PoolView(role, sum(1 for w in workers if w.role is role),
                                sum(1 for w in workers if w.role is role and w.endpoint), b.low, b.high)
                 for role, b in self.bounds.items()}
        by_role = {role: view.ready for role, view in views.items()}
        if self.reader is not None:
            try:
                reported = await asyncio.to_thread(self.reader.roles)
                by_role = {role: reported.get(str(role), 0) for role in views}
            except MetricsUnavailable:
                pass  # the pools' own counts stand in
        return views, by_role

    async def scale(self, plan: Plan) -> None:
        self.plans.put(plan)


def start_planner(planner: Planner, reader: PrometheusSignals, pools: LocalPools,
                  interval_s: float, metrics: PlannerMetrics | None = None) -> threading.Thread:
    """The planner loop in a daemon thread (control/runner.py), over these pools."""
    pools.reader = reader
    return runner.start_planner(planner, reader.read, pools, pools, interval_s, metrics)
