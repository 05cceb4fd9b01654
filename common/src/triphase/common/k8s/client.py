"""Credentials for the Kubernetes API server: in-cluster (the pod's ServiceAccount) or a kubeconfig
(token, token file or client certificate; CA or insecure-skip-tls-verify). Shared by the router's
worker discovery and the operator; both talk to the API with aiohttp."""

from __future__ import annotations

import base64
import dataclasses
import os
import pathlib
import ssl
import tempfile
from typing import Any

import yaml

from triphase.common.errors import UserError

SERVICE_ACCOUNT = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclasses.dataclass
class KubeAccess:
    server: str
    ssl: ssl.SSLContext | bool
    token: str | None = None
    token_file: pathlib.Path | None = None
    namespace: str = "default"

    def headers(self) -> dict[str, str]:
        token = self.token_file.read_text().strip() if self.token_file else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> KubeAccess:
        """In-cluster credentials when running in a pod (and no kubeconfig is named), else a kubeconfig
        (`kubeconfig`, $KUBECONFIG, ~/.kube/config)."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if kubeconfig is None and host and (SERVICE_ACCOUNT / "token").exists():
            context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip()
            return cls(f"https://{host}:{port}", context, token_file=SERVICE_ACCOUNT / "token", namespace=namespace)
        path = pathlib.Path(kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
                            or os.path.expanduser("~/.kube/config"))
        try:
            config = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise UserError(f"cannot read the kubeconfig {path}: {exc.strerror}") from None
        return cls._from_kubeconfig(config, path)

    @classmethod
    def _from_kubeconfig(cls, config: dict[str, Any], path: pathlib.Path) -> KubeAccess:
        def named(kind: str, name: str) -> dict[str, Any]:
            for item in config.get(kind) or []:
                if item.get("name") == name:
                    return dict(item.get(kind[:-1]) or {})
            raise UserError(f"{path}: no {kind[:-1]} named {name!r}")

        context = named("contexts", config.get("current-context", ""))
        cluster, user = named("clusters", context.get("cluster", "")), named("users", context.get("user", ""))
        verify: ssl.SSLContext | bool
        if cluster.get("insecure-skip-tls-verify"):
            verify = False
        else:
            verify = ssl.create_default_context(
                cafile=_material(cluster, "certificate-authority", path),
            ) if cluster.get("certificate-authority") or cluster.get("certificate-authority-data") \
                else ssl.create_default_context()
        cert = _material(user, "client-certificate", path)
        if cert and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(cert, _material(user, "client-key", path))
        token_file = pathlib.Path(user["tokenFile"]) if user.get("tokenFile") else None
        return cls(cluster["server"], verify, token=user.get("token"), token_file=token_file,
                   namespace=context.get("namespace", "default"))


def _material(section: dict[str, Any], key: str, path: pathlib.Path) -> str | None:
    """A file path for `key` or `key-data` (base64, written to a private temporary file)."""
    if section.get(key):
        return str((path.parent / section[key]).resolve())
    data = section.get(f"{key}-data")
    if not data:
        return None
    fd, name = tempfile.mkstemp(prefix="triphase-kube-")
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64decode(data))
    return name
