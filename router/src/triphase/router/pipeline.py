"""The request path as named stages: validate -> tokenize -> place -> prefill -> hand-off -> decode.

`Pipeline.run` takes a validated, tokenized request and yields `Delta`s. Placement is delegated to
the pure pairing policy; this module does the waiting and the fallbacks: no prefill worker, or a
failed prefill, means the decode worker prefills locally; a hand-off that fails before the first
decoded token falls back the same way. (Mid-stream failover is the next step.)
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator

from triphase.common.block_hash import prompt_block_hashes
from triphase.router.errors import Unavailable
from triphase.router.metrics import RouterMetrics
from triphase.router.policy.pairing import select
from triphase.router.registry import Registry
from triphase.router.worker_client import Delta, Sampling, WorkerClient, WorkerFailed

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Trace:
    """What happened to one request (for metrics and tests)."""

    request_id: str
    prefill_worker: str | None = None
    decode_worker: str | None = None
    kv_backend: str | None = None
    local_prefill: bool = False


class Pipeline:
    def __init__(self, registry: Registry, client: WorkerClient, metrics: RouterMetrics, *,
                 block_size: int = 16) -> None:
        self.registry = registry
        self.client = client
        self.metrics = metrics
        self.block_size = block_size

    async def run(self, prompt: list[int], sampling: Sampling, trace: Trace | None = None,
                  ) -> AsyncGenerator[Delta, None]:
        trace = trace or Trace(f"req-{uuid.uuid4().hex[:16]}")
        placement = select(prompt_block_hashes(prompt, self.block_size), self.registry.snapshot())
        if placement is None:
            raise Unavailable("no decode worker is available")
        decode = placement.decode
        trace.decode_worker = decode.worker_id
        if placement.prefill is not None:
            trace.prefill_worker = placement.prefill.worker_id
            try:
                ticket, first = await self.client.prefill(placement.prefill.endpoint, trace.request_id, prompt,
                                                          sampling)
            except WorkerFailed as exc:
                logger.warning("Prefill on %s failed (%s); prefilling on %s", placement.prefill.worker_id, exc,
                               decode.worker_id)
                self.registry.mark_unhealthy(placement.prefill.endpoint)
            else:
                async for delta in self._hand_off(decode.endpoint, prompt, sampling, trace, ticket, first):
                    yield delta
                return
        trace.local_prefill = True
        async for delta in self.client.generate(decode.endpoint, trace.request_id, prompt, sampling):
            yield delta

    async def _hand_off(self, endpoint: str, prompt: list[int], sampling: Sampling, trace: Trace, ticket,  # type: ignore[no-untyped-def]
                        first: Delta) -> AsyncGenerator[Delta, None]:
        yield first  # the prefill worker's first token goes out before the KV moves
        if first.finish_reason is not None:
            await self.client.release(ticket)
            return
        started = time.monotonic()
        skipped = False
        try:
            async for delta in self.client.decode(endpoint, trace.request_id, prompt, sampling, ticket):
                if not skipped:  # the decode worker repeats the first token: already sent
                    skipped = True
                    trace.kv_backend = backend = delta.kv_backend or "grpc"
                    self.metrics.kv_transfer_seconds.labels(self.metrics.model, backend).observe(
                        time.monotonic() - started)
                    self.metrics.kv_transfer_bytes.labels(self.metrics.model, backend).inc(ticket.nbytes)
                    delta = dataclasses.replace(delta, token_ids=delta.token_ids[1:], text="")
                    if not delta.token_ids and delta.finish_reason is None:
                        continue
                yield delta
        except WorkerFailed:
            if skipped:
                raise
            await self.client.release(ticket)
            raise
