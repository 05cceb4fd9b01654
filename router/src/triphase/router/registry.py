"""Worker snapshots from discovery: a static list of endpoints (local mode), each watched over its
WatchStats stream. A worker whose stream breaks is marked unhealthy and re-watched with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from triphase.common.roles import Role
from triphase.router.policy.pairing import WorkerView
from triphase.router.worker_client import WorkerClient, WorkerFailed

logger = logging.getLogger(__name__)


class Registry:
    def __init__(self, client: WorkerClient, endpoints: list[str]) -> None:
        self.client = client
        self.endpoints = list(endpoints)
        self._views: dict[str, WorkerView] = {
            ep: WorkerView(worker_id=ep, endpoint=ep, role=Role.BOTH, healthy=False) for ep in self.endpoints}
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(ep)) for ep in self.endpoints]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def snapshot(self) -> list[WorkerView]:
        return list(self._views.values())

    def mark_unhealthy(self, endpoint: str) -> None:
        view = self._views.get(endpoint)
        if view is not None and view.healthy:
            logger.warning("Worker %s marked unhealthy", view.worker_id)
            self._views[endpoint] = dataclasses.replace(view, healthy=False)
            self.changed.set()

    async def _watch(self, endpoint: str) -> None:
        backoff = 0.2
        while True:
            try:
                async for view in self.client.watch(endpoint):
                    self._views[endpoint] = view
                    self.changed.set()
                    backoff = 0.2
            except WorkerFailed:
                pass
            self.mark_unhealthy(endpoint)
            await asyncio.sleep(backoff)  # reconnect backoff for a down worker, not synchronisation
            backoff = min(backoff * 2, 2.0)
