"""The only module of the operator that talks to the API server (aiohttp, no client library).

Server-side apply with the operator's own field manager: the operator states the fields it owns and
the API server merges; fields others own (the /scale subresource's replicas, a user's annotations) are
left alone. `force` takes over fields another manager applied before (drift is corrected).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp

from triphase.common.k8s.client import KubeAccess

logger = logging.getLogger(__name__)
FIELD_MANAGER = "triphase-operator"
CONNECTIONS = 16

# kind -> (plural, namespaced); the API group comes from the object's apiVersion
RESOURCES = {
    "ConfigMap": ("configmaps", True), "Service": ("services", True), "ServiceAccount": ("serviceaccounts", True),
    "Pod": ("pods", True), "Deployment": ("deployments", True), "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "Role": ("roles", True), "RoleBinding": ("rolebindings", True), "PodMonitor": ("podmonitors", True),
    "PrometheusRule": ("prometheusrules", True), "Secret": ("secrets", True),
    "NetworkPolicy": ("networkpolicies", True),
    "ServingDeployment": ("servingdeployments", True), "ServingPool": ("servingpools", True),
    "Event": ("events", True),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None) -> str:
    plural, namespaced = RESOURCES[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


class Kube:
    def __init__(self, access: KubeAccess) -> None:
        self.access = access
        self._session: aiohttp.ClientSession | None = None
        self._apis: dict[str, tuple[frozenset[str], float]] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, url_path: str, body: Any = None, *, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        if self._session is None:
            # A bounded pool of kept-alive connections: a burst of reconciles queues here instead of
            # opening (and TLS-handshaking) a connection per request.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                                  connector=aiohttp.TCPConnector(limit=CONNECTIONS))
        headers = {**self.access.headers(), "Content-Type": content_type}
        data = None if body is None else json.dumps(body)
        async with self._session.request(method, self.access.server + url_path, data=data, params=params,
                                         headers=headers, ssl=self.access.ssl) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except ValueError:
                    message = text
                raise ApiError(response.status, message)
            return json.loads(text) if text else None

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        result = await self.request(
            "PATCH", path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]), obj,
            params={"fieldManager": FIELD_MANAGER, "force": "true"}, content_type="application/apply-patch+yaml")
        return dict(result)

    async def create(self, obj: dict[str, Any], field_manager: str) -> dict[str, Any] | None:
        """POST the object under `field_manager`; the created object, or None if it exists already."""
        meta = obj["metadata"]
        try:
            return dict(await self.request("POST", path(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj,
                                           params={"fieldManager": field_manager}))
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self.request("GET", path(api_version, kind, namespace, name)))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        body = await self.request("GET", path(api_version, kind, namespace), params={"labelSelector": selector})
        return list(body.get("items") or [])

    async def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete (in the background); `uid`: only that very object (409 if the name now holds another)."""
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path(api_version, kind, namespace, name), options)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                           status: dict[str, Any]) -> None:
        await self.request("PATCH", path(api_version, kind, namespace, name) + "/status", {"status": status},
                           content_type="application/merge-patch+json")

    async def patch_labels(self, api_version: str, kind: str, namespace: str, name: str,
                           labels: dict[str, str]) -> None:
        await self.request("PATCH", path(api_version, kind, namespace, name), {"metadata": {"labels": labels}},
                           content_type="application/merge-patch+json")

    async def api_resources(self, group_version: str, max_age_s: float = 60.0) -> frozenset[str]:
        """The resources (plurals) the API server serves in `group_version`, empty when it serves none of
        them (cached for `max_age_s`: asked every reconcile)."""
        now = time.monotonic()
        cached = self._apis.get(group_version)
        if cached is not None and now - cached[1] < max_age_s:
            return cached[0]
        try:
            listing = await self.request("GET", f"/apis/{group_version}")
            found = frozenset(r["name"] for r in listing.get("resources") or [] if "/" not in r["name"])
        except ApiError as exc:
            if exc.status != 404:
                raise
            found = frozenset()
        self._apis[group_version] = (found, now)
        return found
