"""The worker's life around its RPCs: health tied to the engine's progress, and graceful shutdown.

Health. The standard gRPC health service answers SERVING for "" and for `triphase.api.v1.WorkerService`
only while the engine makes progress and the worker admits work. A stalled or dead engine, a drained
worker and a worker shutting down are NOT_SERVING, so Kubernetes readiness probes and the router
(WatchStats ends with UNAVAILABLE when the engine is not healthy) stop sending work. A dead engine
ends `monitor`, and the process exits non-zero so that Kubernetes or `triphase up` restarts it.

Shutdown (SIGTERM). NOT_SERVING at once -> `delay` seconds for endpoints to update (0 under Kubernetes,
where the pod's preStop hook waits before the signal) -> in-flight streams finish, until `grace` runs
out -> the rest are handed over (their streams end with UNAVAILABLE; the router resumes them elsewhere)
-> prefilled KV still pinned is left for its readers until the same deadline -> the server stops.
The operator sets terminationGracePeriodSeconds above preStop + grace, so all of it fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2

if TYPE_CHECKING:
    import grpc

    from triphase.workers.server import WorkerServicer

logger = logging.getLogger(__name__)

SERVICES = ("", "triphase.api.v1.WorkerService")
_STATUS = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}


class Health:
    """The gRPC health service, every service name at once."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.serving: bool | None = None

    async def set(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            for name in SERVICES:
                await self.servicer.set(name, _STATUS[serving])


async def monitor(worker: WorkerServicer, interval_s: float = 0.5) -> str:
    """Keep health in step with the engine and the drain state; return why, once the engine is dead."""
    while True:
        state = worker.engine.health()
        serving = state == "ok" and not worker.draining
        if worker.health is not None and serving != worker.health.serving:
            if state != "ok":
                logger.error("Engine %s: worker %s is NOT_SERVING", state, worker.worker_id)
            await worker.health.set(serving)
            worker.engine.stats_changed.set()  # WatchStats streams notice at once
        if state == "dead":
            return f"engine dead: {type(worker.engine.failure).__name__}: {worker.engine.failure}"
        await asyncio.sleep(interval_s)  # the engine thread's heartbeat is polled, not awaited


async def shutdown(worker: WorkerServicer, server: grpc.aio.Server, *, delay_s: float, grace_s: float) -> None:
    """Drain, let work finish or hand it over, stop the server (see the module docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, delay_s) + max(0.0, grace_s)
    worker.state.drain()
    if worker.health is not None:
        await worker.health.set(False)
    if delay_s > 0:
        await asyncio.sleep(delay_s)  # endpoint propagation: routers stop placing work here
    handed = await worker.settle(deadline - loop.time(), keeps_decoding=False, keeps_prefilling=False)
    while worker.engine.stats.pinned and worker.engine.health() != "dead" and loop.time() < deadline:
        worker.engine.stats_changed.clear()
        with contextlib.suppress(TimeoutError):  # each release publishes stats, which sets the event
            await asyncio.wait_for(worker.engine.stats_changed.wait(), min(deadline - loop.time(), 0.5))
    logger.info("Worker %s drained (%d streams handed over, %d KV pins left)", worker.worker_id, handed,
                worker.engine.stats.pinned)
    await server.stop(grace=1.0)
