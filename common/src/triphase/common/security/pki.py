"""A deployment's own certificate authority and the certificates of its components (mTLS).

Each ServingDeployment (and each `triphase up`) has one CA; every component certificate it signs
names one `Identity` in its common name and `<identity>.triphase.internal` in its DNS name, and is good
for both ends of a connection. A certificate signed by the deployment's CA is what makes a process a
member of that deployment; its identity is what the workers authorise methods by (workers/authz.py).
Clients verify the server's name against `server_name(WORKER)`, not its address: pods are reached by
IP, and a worker's certificate need not change when its pod does.

Keys are ECDSA P-256 (fast to make and to verify). Component certificates live `LEAF_DAYS` and are
renewed when less than a third of that is left (`renewal_due`); the CA lives `CA_DAYS`. Everything is
PEM bytes: what a Secret or a file holds.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import secrets

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 30
DOMAIN = "triphase.internal"
BACKDATE = datetime.timedelta(minutes=5)  # tolerate clocks a little behind the issuer's


class Identity(enum.StrEnum):
    """What a component certificate says its holder is."""

    ROUTER = "router"  # the OpenAI front end: serves clients, calls workers
    WORKER = "worker"  # any worker of the deployment (its role changes at runtime; its identity does not)
    CONTROL = "control"  # the operator or the local control loop: role switches, drains


def server_name(identity: Identity) -> str:
    return f"{identity.value}.{DOMAIN}"


@dataclasses.dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_ca(name: str, *, days: int = CA_DAYS, now: datetime.datetime | None = None) -> KeyPair:
    """A self-signed CA for one deployment (`name` goes into its subject, for people reading it)."""
    now = now or _now()
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "triphase"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"triphase CA {name}"[:64])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _pem(key))


def issue(ca: KeyPair, identity: Identity, *, days: int = LEAF_DAYS,
          now: datetime.datetime | None = None) -> KeyPair:
    """A certificate for one component kind, signed by `ca`, for client and server use."""
    now = now or _now()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key made by triphase")
    key = _key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "triphase"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, identity.value)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name(identity))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _pem(key))


def identity_of(cert_pem: bytes) -> str:
    """The common name a certificate carries."""
    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def renewal_due(cert_pem: bytes, *, now: datetime.datetime | None = None) -> bool:
    """Whether less than a third of the certificate's lifetime is left (or it does not parse)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return True
    now = now or _now()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return now >= cert.not_valid_after_utc - lifetime / 3


def signed_by(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """Whether `cert_pem` was issued by the CA `ca_cert_pem` (a leaf left over from an older CA is not)."""
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca_cert_pem))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def new_secret() -> bytes:
    """32 random bytes, hex: the KV ticket key or the prefix-cache salt."""
    return secrets.token_hex(32).encode()
