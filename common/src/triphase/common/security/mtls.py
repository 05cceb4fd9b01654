"""A component's mTLS bundle and the gRPC channels and servers built on it.

The bundle is one directory (a mounted Secret on Kubernetes, what `triphase up` writes locally):

  ca.crt         the deployment's CA (pki.new_ca): a peer is a member when its certificate chains to it
  tls.crt        this component's certificate (pki.issue): its common name is its identity
  tls.key        its key
  kv-ticket.key  workers only: the HMAC key of KV and embedding tickets (tickets.py)
  prefix-salt    workers and router: the root of the prefix-cache block hashes (block_hash.salted_root)

Rotation: the files are read again when asked at most every `reload_s` seconds, and when they changed
`generation` grows. A server presents the new certificate from its next handshake on (dynamic
credentials); `ChannelCache` opens new channels for new calls and leaves calls in flight on the old
ones. A component given no bundle speaks plaintext and authorises nothing (a laptop, a test).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pathlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc

from triphase.common.errors import UserError
from triphase.common.security import pki

logger = logging.getLogger(__name__)

CA, CERT, KEY, TICKET_KEY, PREFIX_SALT = "ca.crt", "tls.crt", "tls.key", "kv-ticket.key", "prefix-salt"
REQUIRED = (CA, CERT, KEY)
RELOAD_S = 30.0
# Clients check a worker's certificate against this name, whatever address they reach it by.
TARGET_NAME_OPTION = ("grpc.ssl_target_name_override", pki.server_name(pki.Identity.WORKER))


class Bundle:
    def __init__(self, directory: pathlib.Path | None, *, reload_s: float = RELOAD_S,
                 files: dict[str, bytes] | None = None) -> None:
        self.directory = directory  # None: held in memory (`from_files`), never re-read
        self.reload_s = reload_s
        self.generation = 0
        self._lock = threading.Lock()
        self._files = self._read() if files is None else self._checked_files(files, "the bundle")
        self._checked = time.monotonic()

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Bundle:
        """A bundle held in memory (the operator's own identity, issued from the deployment's CA)."""
        return cls(None, files=files)

    @staticmethod
    def _checked_files(files: dict[str, bytes], where: str) -> dict[str, bytes]:
        missing = [name for name in REQUIRED if name not in files]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}")
        if not pki.identity_of(files[CERT]):
            raise UserError(f"{where}: {CERT} names no identity (common name)")
        return files

    def _read(self) -> dict[str, bytes]:
        assert self.directory is not None
        files = {name: (self.directory / name).read_bytes() for name in (*REQUIRED, TICKET_KEY, PREFIX_SALT)
                 if (self.directory / name).is_file()}
        return self._checked_files(files, f"mTLS directory {self.directory}")

    def refresh(self) -> bool:
        """Read the files again if `reload_s` has passed; whether they changed. A half-written set (a
        rotation in progress) is ignored until it is whole."""
        if self.directory is None or time.monotonic() - self._checked < self.reload_s:
            return False
        with self._lock:
            self._checked = time.monotonic()
            try:
                files = self._read()
            except (OSError, UserError, ValueError) as exc:
                logger.warning("Keeping the current mTLS files: %s", exc)
                return False
            if files == self._files:
                return False
            self._files = files
            self.generation += 1
        logger.info("mTLS files in %s changed: new connections use them", self.directory)
        return True

    def replace(self, files: dict[str, bytes]) -> None:
        """New contents for a bundle held in memory (a renewed certificate): new channels use them."""
        with self._lock:
            self._files = self._checked_files(files, "the bundle")
            self.generation += 1

    @property
    def identity(self) -> str:
        return pki.identity_of(self._files[CERT])

    @property
    def ticket_key(self) -> bytes | None:
        return self._files.get(TICKET_KEY) or None

    @property
    def prefix_salt(self) -> bytes:
        return self._files.get(PREFIX_SALT, b"").strip()

    @property
    def files(self) -> dict[str, bytes]:
        return dict(self._files)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._files[CERT]).hexdigest()[:12]

    def channel_credentials(self) -> grpc.ChannelCredentials:
        self.refresh()
        files = self._files
        return grpc.ssl_channel_credentials(root_certificates=files[CA], private_key=files[KEY],
                                            certificate_chain=files[CERT])

    def _server_config(self) -> Any:
        files = self._files
        return grpc.ssl_server_certificate_configuration([(files[KEY], files[CERT])], root_certificates=files[CA])

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate from this deployment's CA and follow rotation."""
        seen = [self.generation]

        def fetch() -> Any:  # called by gRPC on each handshake, on its own thread
            self.refresh()
            if self.generation == seen[0]:
                return None  # unchanged
            seen[0] = self.generation
            return self._server_config()

        return grpc.dynamic_ssl_server_credentials(self._server_config(), fetch,
                                                   require_client_authentication=True)


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's identity (its certificate's common name); None on a plaintext connection."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode(errors="replace") if names else None


class ChannelCache:
    """One channel per endpoint, over mTLS when there is a bundle; after a rotation new calls get new
    channels and the old ones stay open for the calls still on them (closed with the cache)."""

    def __init__(self, bundle: Bundle | None, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.bundle = bundle
        self.options = list(options)
        self._channels: dict[str, tuple[int, grpc.aio.Channel]] = {}
        self._retired: list[grpc.aio.Channel] = []

    def get(self, endpoint: str) -> grpc.aio.Channel:
        if self.bundle is not None:
            self.bundle.refresh()
        generation = self.bundle.generation if self.bundle is not None else 0
        entry = self._channels.get(endpoint)
        if entry is not None and entry[0] == generation:
            return entry[1]
        if entry is not None:
            self._retired.append(entry[1])
        if self.bundle is None:
            channel = grpc.aio.insecure_channel(endpoint, options=self.options)
        else:
            channel = grpc.aio.secure_channel(endpoint, self.bundle.channel_credentials(),
                                              options=[*self.options, TARGET_NAME_OPTION])
        self._channels[endpoint] = (generation, channel)
        return channel

    def is_current(self, endpoint: str, channel: grpc.aio.Channel) -> bool:
        entry = self._channels.get(endpoint)
        return entry is not None and entry[1] is channel

    async def drop(self, endpoint: str) -> None:
        entry = self._channels.pop(endpoint, None)
        if entry is not None:
            await entry[1].close()

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        for channel in self._retired:
            await channel.close()
        self._channels.clear()
        self._retired.clear()


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mtls-dir", type=pathlib.Path, metavar="DIR",
                        help="mutual TLS with the deployment's other components: ca.crt, tls.crt, tls.key (and "
                             "kv-ticket.key, prefix-salt) in DIR, re-read when they change (default: plaintext)")


def from_args(args: argparse.Namespace, identity: pki.Identity) -> Bundle | None:
    """The bundle --mtls-dir names (None without one); UserError unless its certificate is `identity`'s."""
    if not getattr(args, "mtls_dir", None):
        return None
    bundle = Bundle(args.mtls_dir)
    if bundle.identity != identity.value:
        raise UserError(f"--mtls-dir {args.mtls_dir} holds a certificate for {bundle.identity!r}, not for "
                        f"{identity.value!r}")
    return bundle


def component_files(ca: pki.KeyPair, identity: pki.Identity, *, ticket_key: bytes,
                    prefix_salt: bytes) -> dict[str, bytes]:
    """One component's bundle: a fresh certificate signed by `ca`, and the deployment's secrets that
    component needs (workers: both; the router: the salt, to hash prompts as the workers do)."""
    leaf = pki.issue(ca, identity)
    files = {CA: ca.cert_pem, CERT: leaf.cert_pem, KEY: leaf.key_pem}
    if identity in (pki.Identity.WORKER, pki.Identity.ROUTER):
        files[PREFIX_SALT] = prefix_salt
    if identity is pki.Identity.WORKER:
        files[TICKET_KEY] = ticket_key
    return files


def write_bundle(directory: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    """Write one bundle, readable by its owner only."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in files.items():
        path = directory / name
        path.touch(mode=0o600)
        path.write_bytes(data)
    return directory


def write_deployment(root: pathlib.Path, name: str) -> dict[pki.Identity, pathlib.Path]:
    """A fresh CA, ticket key and salt, and a bundle under `root/<identity>` for each component kind
    (`triphase up`, tests). The CA's key is not kept: nothing more will be issued."""
    ca, ticket_key, salt = pki.new_ca(name), pki.new_secret(), pki.new_secret()
    return {identity: write_bundle(root / identity.value, component_files(ca, identity, ticket_key=ticket_key,
                                                                          prefix_salt=salt))
            for identity in pki.Identity}


def sync_channel(endpoint: str, bundle: Bundle | None) -> grpc.Channel:
    """A blocking channel to a worker (tools and tests), over mTLS when there is a bundle."""
    if bundle is None:
        return grpc.insecure_channel(endpoint)
    return grpc.secure_channel(endpoint, bundle.channel_credentials(), options=[TARGET_NAME_OPTION])
