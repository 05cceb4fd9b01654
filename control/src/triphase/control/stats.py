"""Live worker snapshots for the control loops: one WatchStats stream per worker endpoint.

Each report becomes a `WorkerView` stamped with its arrival time (the loop's monotonic clock), so
the policy can tell a quiet worker (it still reports every interval) from a silent one. A stream
that breaks marks the worker unhealthy and is re-opened with backoff; the set of endpoints can
change at any time (Kubernetes discovery) and a dropped endpoint is forgotten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from triphase.api.v1 import worker_pb2 as pb
from triphase.common import role_pb
from triphase.common.process.signals import cancel_and_wait
from triphase.common.worker_stubs import WorkerStubs
from triphase.control.balancer import WorkerView

logger = logging.getLogger(__name__)



def view_of(stats: pb.WorkerStats, seen_at: float) -> WorkerView:
    total = stats.total_kv_blocks
    return WorkerView(
        worker_id=stats.worker_id, role=role_pb.from_pb(stats.role), seen_at=seen_at,
        switching=stats.switching, draining=stats.draining, running=stats.running_requests,
        waiting=stats.waiting_requests, queued_prefill_tokens=stats.queued_prefill_tokens,
        kv_usage=1 - stats.free_kv_blocks / total if total else 0.0, pinned=stats.pinned_requests,
        prefill_tokens_per_s=stats.prefill_tokens_per_second, decode_step_s=stats.decode_step_seconds,
        prefill_tokens_total=stats.prefill_tokens_total)


class StatsWatcher:
    """`channels`: the worker stubs shared with the actuator, over mTLS with a bundle whose certificate
    says `control` (common/security/mtls.py), which is what may switch roles."""

    def __init__(self, channels: WorkerStubs, interval_s: float = 0.5) -> None:
        self.channels = channels
        self.interval_s = interval_s
        self.views: dict[str, WorkerView] = {}  # by endpoint
        self.models: dict[str, str] = {}  # by endpoint: the model each worker serves
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    def set_endpoints(self, endpoints: list[str]) -> None:
        wanted = set(endpoints)
        for endpoint in [ep for ep in self._tasks if ep not in wanted]:
            self._tasks.pop(endpoint).cancel()
            self.views.pop(endpoint, None)
            self.models.pop(endpoint, None)
            closing = asyncio.create_task(self.channels.forget(endpoint))  # pods come and go
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        for endpoint in endpoints:
            if endpoint not in self._tasks:
                self._tasks[endpoint] = asyncio.create_task(self._watch(endpoint))
        self.changed.set()

    def endpoint_of(self, worker_id: str) -> str | None:
        return next((ep for ep, v in self.views.items() if v.worker_id == worker_id), None)

    def snapshot(self) -> list[WorkerView]:
        return list(self.views.values())

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)
        await asyncio.gather(*self._closing)

    async def _watch(self, endpoint: str) -> None:
        backoff = 0.2
        while True:
            try:
                stream = self.channels.stub(endpoint).WatchStats(pb.WatchStatsRequest(interval_seconds=self.interval_s))
                async for stats in stream:
                    self.views[endpoint] = view_of(stats, time.monotonic())
                    self.models[endpoint] = stats.model
                    self.changed.set()
                    backoff = 0.2
            except grpc.aio.AioRpcError as exc:
                logger.debug("Stats of %s unavailable: %s", endpoint, exc.code().name)
            view = self.views.get(endpoint)
            if view is not None and view.healthy:
                self.views[endpoint] = dataclasses.replace(view, healthy=False)
                self.changed.set()
            await asyncio.sleep(backoff)  # reconnect backoff for a down worker, not synchronisation
            backoff = min(backoff * 2, 2.0)
