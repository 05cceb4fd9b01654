"""Reading worker pods: whether one can take traffic and where its gRPC server listens. Shared by the
router's discovery and the operator (status counts and the role balancer), so they agree on both."""

from __future__ import annotations

from typing import Any

from triphase.common import labels


def pod_ready(pod: dict[str, Any]) -> bool:
    """Running, Ready and not terminating."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return status.get("phase") == "Running" and not meta.get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_endpoint(pod: dict[str, Any]) -> str | None:
    """host:port of a worker pod that can take traffic, else None: its `triphase.dev/endpoint`
    annotation if present, else podIP and the container port named `grpc` (default 50051)."""
    if not pod_ready(pod):
        return None
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    override = (meta.get("annotations") or {}).get(labels.ENDPOINT)
    if override:
        return str(override)
    ip = status.get("podIP")
    if not ip:
        return None
    port = labels.DEFAULT_GRPC_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for container_port in container.get("ports") or []:
            if container_port.get("name") == labels.GRPC_PORT_NAME:
                port = container_port["containerPort"]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
