"""A real Kubernetes control plane for tests: one per session (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok with fake GPU nodes), a fresh namespace per module.
Binaries are built from the Go module proxy on first use (never skipped for lack of them)."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import uuid
from typing import Any

from triphase.local.cluster import binaries, controlplane


@dataclasses.dataclass
class Kube:
    cluster: controlplane.Cluster
    namespace: str

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.cluster.kubeconfig

    def api(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.cluster.api(method, path, body, **kwargs)

    def account_kubeconfig(self, path: pathlib.Path, account: str, namespace: str | None = None,
                           user: str = "account") -> pathlib.Path:
        """A kubeconfig at `path` with a one-hour token of ServiceAccount `account` (what a pod of it gets)."""
        token = self.api("POST", f"/api/v1/namespaces/{namespace or self.namespace}/serviceaccounts/{account}/token",
                         {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": {"expirationSeconds": 3600}})["status"]["token"]
        controlplane.write_kubeconfig(path, self.cluster.server, self.cluster.state / "pki" / "ca.crt", token, user)
        return path

    def kubectl(self, *args: str, check: bool = True, kubeconfig: pathlib.Path | None = None,
                input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        tools = binaries.ensure(progress=False)
        result = subprocess.run([tools["kubectl"], "--kubeconfig", str(kubeconfig or self.kubeconfig), "-n",
                                 self.namespace, *args], capture_output=True, text=True, input=input_text,
                                timeout=150)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result


def start_cluster(state: pathlib.Path) -> controlplane.Cluster:
    return controlplane.up(state, nodes=4, gpus_per_node=8, progress=True, timeout=120)


# Every test namespace enforces the Pod Security "restricted" level: a pod the operator (or a chart) makes
# that breaks it is refused by the API server, as on a hardened cluster.
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}


def new_namespace(cluster: controlplane.Cluster, prefix: str) -> str:
    name = f"{prefix[:40].lower().replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    cluster.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": {"name": name, "labels": RESTRICTED}})
    return name

