"""Spreads running streams over the decode workers (the rule: policy/rebalance.py).

Every `interval_s` the router compares the decode workers' streams; each worker with too many more
than the least loaded one is asked to hand some over (HandOver): those streams end with
UNAVAILABLE and the pipeline resumes them, with the tokens already sent, on the least loaded
worker, as after a role switch. Only streams that can still generate `min_new_tokens` and whose
context is at most `max_context_tokens` move: a resume prefills that context again on the target.
"""

from __future__ import annotations

import asyncio
import logging

from triphase.common.roles import Role
from triphase.router.metrics import RouterMetrics
from triphase.router.policy.rebalance import hand_overs
from triphase.router.registry import Registry
from triphase.router.worker_client import WorkerClient, WorkerFailed

logger = logging.getLogger(__name__)


class StreamBalancer:
    def __init__(self, registry: Registry, client: WorkerClient, metrics: RouterMetrics, *, min_gap: int = 4,
                 interval_s: float = 2.0, max_context_tokens: int = 4096, min_new_tokens: int = 16) -> None:
        self.registry = registry
        self.client = client
        self.metrics = metrics
        self.min_gap = min_gap
        self.interval_s = interval_s
        self.max_context_tokens = max_context_tokens
        self.min_new_tokens = min_new_tokens

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)  # the balancing period (streams need a while to move)
            await self.once()

    async def once(self) -> int:
        loads = {w.endpoint: w.decode_load for w in self.registry.snapshot() if w.available and w.role is Role.DECODE}
        moved = 0
        for endpoint, count in hand_overs(loads, self.min_gap).items():
            try:
                moved += await self.client.hand_over(endpoint, count, self.max_context_tokens, self.min_new_tokens)
            except WorkerFailed as exc:
                logger.debug("Hand-over on %s failed: %s", endpoint, exc)
        if moved:
            self.metrics.streams_rebalanced(moved)
            logger.info("Moving %d streams off crowded decode workers (streams per worker: %s)", moved,
                        sorted(loads.values(), reverse=True))
        return moved
