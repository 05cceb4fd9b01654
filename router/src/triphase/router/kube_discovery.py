"""Kubernetes worker discovery: the router watches the worker pods of its deployment and keeps the
registry's endpoint set equal to the pods that are Running, Ready and not terminating.

A pod's endpoint is its `triphase.dev/endpoint` annotation if present, else podIP and the container
port named `grpc` (default 50051). Roles are not taken from labels: each worker reports its current
role over WatchStats, so a runtime role switch needs no relabelling. Talks to the API server with
aiohttp (list, then watch from the list's resourceVersion; relist on 410 Gone) with the credentials
of triphase.common.k8s.client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from triphase.common.k8s.client import KubeAccess
from triphase.common.k8s.pods import pod_endpoint

logger = logging.getLogger(__name__)
class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class PodWatcher:
    """Keeps `on_change(sorted endpoints)` up to date with the selected worker pods."""

    def __init__(self, access: KubeAccess, namespace: str, selector: str,
                 on_change: Callable[[list[str]], None]) -> None:
        self.access = access
        self.path = f"/api/v1/namespaces/{namespace}/pods"
        self.selector = selector
        self.on_change = on_change
        self.pods: dict[str, dict[str, Any]] = {}
        self._published: list[str] | None = None

    def _publish(self) -> None:
        endpoints = sorted({ep for pod in self.pods.values() if (ep := pod_endpoint(pod))})
        if endpoints != self._published:
            self._published = endpoints
            self.on_change(endpoints)

    async def run(self) -> None:
        backoff = 0.5
        async with aiohttp.ClientSession(headers=None) as session:
            while True:
                try:
                    version = await self._list(session)
                    backoff = 0.5
                    while True:
                        version = await self._watch(session, version)
                except _Gone:
                    continue
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                    logger.warning("Pod discovery failed (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)  # reconnect backoff, not synchronisation
                backoff = min(backoff * 2, 10.0)

    async def _list(self, session: aiohttp.ClientSession) -> str:
        async with session.get(self.access.server + self.path, params={"labelSelector": self.selector},
                               headers=self.access.headers(), ssl=self.access.ssl) as response:
            response.raise_for_status()
            body = await response.json()
        self.pods = {p["metadata"]["uid"]: p for p in body.get("items") or []}
        self._publish()
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, session: aiohttp.ClientSession, version: str) -> str:
        params = {"labelSelector": self.selector, "watch": "1", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": "240"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with session.get(self.access.server + self.path, params=params, headers=self.access.headers(),
                               ssl=self.access.ssl, timeout=timeout) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise ValueError(f"watch error: {obj.get('message')}")
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind in ("ADDED", "MODIFIED"):
                    self.pods[obj["metadata"]["uid"]] = obj
                elif kind == "DELETED":
                    self.pods.pop(obj["metadata"]["uid"], None)
                if kind != "BOOKMARK":
                    self._publish()
        return version
