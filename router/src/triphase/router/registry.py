"""Worker snapshots from discovery: a set of endpoints (a static list in local mode, or the pods that
Kubernetes discovery finds), each watched over its WatchStats stream. A worker whose stream breaks
is marked unhealthy and re-watched with backoff; an endpoint that discovery drops is forgotten."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator

from triphase.common.process.signals import cancel_and_wait
from triphase.common.roles import Role
from triphase.router.policy.pairing import WorkerView
from triphase.router.worker_client import WorkerClient, WorkerFailed

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Outstanding:
    """What this router has sent a worker and not yet seen finish."""

    prefill_tokens: int = 0
    streams: int = 0


class Registry:
    def __init__(self, client: WorkerClient, endpoints: list[str] | None = None) -> None:
        self.client = client
        self._initial = list(endpoints or [])
        self._views: dict[str, WorkerView] = {}
        self._outstanding: dict[str, Outstanding] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.changed = asyncio.Event()

    @property
    def endpoints(self) -> list[str]:
        return list(self._tasks)

    def start(self) -> None:
        self.set_endpoints(self._initial)

    def set_endpoints(self, endpoints: list[str]) -> None:
        """Watch exactly these endpoints (new ones start unhealthy until their first stats)."""
        wanted = set(endpoints)
        for endpoint in [ep for ep in self._tasks if ep not in wanted]:
            self._tasks.pop(endpoint).cancel()
            self._views.pop(endpoint, None)
            self._outstanding.pop(endpoint, None)  # calls still in flight hold their own entry
            logger.info("Worker %s removed", endpoint)
        for endpoint in endpoints:
            if endpoint not in self._tasks:
                self._views[endpoint] = WorkerView(worker_id=endpoint, endpoint=endpoint, role=Role.BOTH,
                                                   healthy=False)
                self._tasks[endpoint] = asyncio.create_task(self._watch(endpoint))
                logger.info("Worker %s added", endpoint)
        self.changed.set()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)

    def snapshot(self) -> list[WorkerView]:
        """Every worker as last reported, with what this router has outstanding on it."""
        views = []
        for endpoint, view in self._views.items():
            mine = self._outstanding.get(endpoint)
            if mine is not None and (mine.prefill_tokens or mine.streams):
                view = dataclasses.replace(view, outstanding_prefill_tokens=mine.prefill_tokens,
                                           outstanding_streams=mine.streams)
            views.append(view)
        return views

    @contextlib.contextmanager
    def prefilling(self, endpoint: str, tokens: int) -> Iterator[None]:
        """A Prefill call in flight on `endpoint` (counted in its load until it returns)."""
        mine = self._outstanding.setdefault(endpoint, Outstanding())
        mine.prefill_tokens += tokens
        try:
            yield
        finally:
            mine.prefill_tokens -= tokens

    @contextlib.contextmanager
    def streaming(self, endpoint: str) -> Iterator[None]:
        """A request streaming from `endpoint` (counted in its load until the stream ends)."""
        mine = self._outstanding.setdefault(endpoint, Outstanding())
        mine.streams += 1
        try:
            yield
        finally:
            mine.streams -= 1

    def set_role(self, endpoint: str, role: Role) -> None:
        """The worker said it has `role` (refusing a call its role does not allow): see it so until its
        stats say otherwise. It stays healthy: a switched worker is not a sick one."""
        view = self._views.get(endpoint)
        if view is not None and view.role is not role:
            logger.info("Worker %s is %s now (it refused a call for its old role)", view.worker_id, role)
            self._views[endpoint] = dataclasses.replace(view, role=role)
            self.changed.set()

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
                    if endpoint not in self._tasks:
                        return
                    self._views[endpoint] = view
                    self.changed.set()
                    backoff = 0.2
            except WorkerFailed:
                pass
            self.mark_unhealthy(endpoint)
            await asyncio.sleep(backoff)  # reconnect backoff for a down worker, not synchronisation
            backoff = min(backoff * 2, 2.0)
