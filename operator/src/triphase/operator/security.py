"""A ServingDeployment's mTLS material as Secrets: its CA, and the bundles its pods mount.

  Secret <name>-mtls-ca      the CA's certificate and key, the KV ticket key and the prefix-cache salt;
                             made once, read only by the operator (no pod mounts it)
  Secret <name>-mtls-worker  ca.crt, tls.crt, tls.key, kv-ticket.key, prefix-salt (common/security/mtls.py)
  Secret <name>-mtls-router  ca.crt, tls.crt, tls.key, prefix-salt

Every reconcile checks the component Secrets and issues a fresh certificate where one is missing, in the
last third of its life (pki.renewal_due) or not signed by the deployment's CA; the kubelet updates the
mounted files and the components re-read them (new connections use the new certificate), so a renewal
rolls no pod. The operator's own identity towards the workers (`control`, for the role balancer) is
issued in memory from the same CA (`control_bundle`). The operator gets these Secrets by name only; it
neither lists nor watches Secrets.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from triphase.common.labels import COMPONENT
from triphase.common.security import mtls, pki
from triphase.operator.builders import common_labels

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SECRETS = {pki.Identity.WORKER: "worker", pki.Identity.ROUTER: "router"}  # the bundles pods mount


def ca_secret_name(name: str) -> str:
    return f"{name}-mtls-ca"


def bundle_secret_name(name: str, identity: pki.Identity) -> str:
    return f"{name}-mtls-{identity.value}"


@dataclasses.dataclass(frozen=True)
class Authority:
    """What the CA Secret holds."""

    ca: pki.KeyPair
    ticket_key: bytes
    prefix_salt: bytes

    @classmethod
    def new(cls, name: str) -> Authority:
        return cls(pki.new_ca(name), pki.new_secret(), pki.new_secret())

    @classmethod
    def from_secret(cls, secret: dict[str, Any]) -> Authority:
        data = decode(secret)
        return cls(pki.KeyPair(data[CA_CERT], data[CA_KEY]), data[mtls.TICKET_KEY], data[mtls.PREFIX_SALT])

    def bundle(self, identity: pki.Identity) -> dict[str, bytes]:
        return mtls.component_files(self.ca, identity, ticket_key=self.ticket_key, prefix_salt=self.prefix_salt)


def decode(secret: dict[str, Any]) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}


def _secret(name: str, namespace: str, parent: str, files: dict[str, bytes]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": {**common_labels(parent), COMPONENT: "mtls"}},
            "data": {key: base64.b64encode(value).decode() for key, value in sorted(files.items())}}


def ca_secret(name: str, namespace: str, authority: Authority) -> dict[str, Any]:
    return _secret(ca_secret_name(name), namespace, name, {
        CA_CERT: authority.ca.cert_pem, CA_KEY: authority.ca.key_pem, mtls.TICKET_KEY: authority.ticket_key,
        mtls.PREFIX_SALT: authority.prefix_salt})


def bundle_secret(name: str, namespace: str, identity: pki.Identity, authority: Authority) -> dict[str, Any]:
    return _secret(bundle_secret_name(name, identity), namespace, name, authority.bundle(identity))


def reissue_reason(secret: dict[str, Any] | None, authority: Authority) -> str | None:
    """Why a component Secret needs a fresh certificate (None: it is good)."""
    if secret is None:
        return "missing"
    data = decode(secret)
    cert = data.get(mtls.CERT, b"")
    if data.get(mtls.CA) != authority.ca.cert_pem or not pki.signed_by(cert, authority.ca.cert_pem):
        return "not from the deployment's CA"
    if pki.renewal_due(cert):
        return "due for renewal"
    return None


def control_bundle(authority: Authority) -> mtls.Bundle:
    """The operator's `control` identity towards this deployment's workers, in memory."""
    return mtls.Bundle.from_files(authority.bundle(pki.Identity.CONTROL))
