"""The one way a component calls workers: a WorkerService stub per worker endpoint.

Used by the router (generate, hand-offs), the control loops (stats, role switches) and the workers
themselves (pulling KV and image embeddings from each other). One channel per endpoint from the mTLS
channel cache (common/security/mtls.py: a certificate rotation gives new calls new channels while calls in
flight finish on the old ones), and one stub per channel: a stub builds its method objects once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from triphase.api.v1 import worker_pb2_grpc
from triphase.common.security import mtls

# A worker that restarted is reconnected to within 2 s by every caller: gRPC's default backoff grows to
# two minutes over the failed attempts while it was down, leaving it out of the router's and the control
# loop's view for that long.
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2_000))


class WorkerStubs:
    """`bundle`: this component's certificate and the deployment's CA; None: plaintext. `options`:
    gRPC channel options (message sizes, keepalive) for every channel, besides RECONNECT."""

    def __init__(self, bundle: mtls.Bundle | None = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        self._channels = mtls.ChannelCache(bundle, [*RECONNECT, *options])
        self._stubs: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerServiceStub]] = {}

    def stub(self, endpoint: str) -> worker_pb2_grpc.WorkerServiceStub:
        channel = self._channels.get(endpoint)
        entry = self._stubs.get(endpoint)
        if entry is None or entry[0] is not channel:
            entry = self._stubs[endpoint] = (channel, worker_pb2_grpc.WorkerServiceStub(channel))
        return entry[1]

    async def forget(self, endpoint: str) -> None:
        """Close the endpoint's channel (a worker that left); a later call opens a new one."""
        self._stubs.pop(endpoint, None)
        await self._channels.drop(endpoint)

    async def close(self) -> None:
        self._stubs.clear()
        await self._channels.close()
