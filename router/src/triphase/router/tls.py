"""HTTPS for the OpenAI API: the server's TLS context, following its certificate files.

`--tls-cert` and `--tls-key` (a `kubernetes.io/tls` Secret's tls.crt and tls.key on Kubernetes) are
loaded into one context; `follow` reloads them into the same context when they change, so new
connections get the renewed certificate (cert-manager's, or anyone's) and open ones keep theirs. TLS 1.2
is the oldest version offered.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib
import ssl

from triphase.common.errors import UserError

logger = logging.getLogger(__name__)


class ServerTls:
    def __init__(self, cert: pathlib.Path, key: pathlib.Path) -> None:
        self.cert, self.key = cert, key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._seen = self._digest()
        try:
            self.context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot use {cert} and {key} as the API's certificate and key: {exc}") from None

    def _digest(self) -> str:
        try:
            return hashlib.sha256(self.cert.read_bytes() + self.key.read_bytes()).hexdigest()
        except OSError:
            return ""

    def reload(self) -> bool:
        """Load the files again if they changed and are a valid pair; whether it did."""
        seen = self._digest()
        if not seen or seen == self._seen:
            return False
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:  # half-rotated: try again next time
            logger.warning("Keeping the API's certificate: %s", exc)
            return False
        self._seen = seen
        logger.info("The API's certificate was reloaded from %s", self.cert)
        return True

    async def follow(self, interval_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(interval_s)  # a poll, not synchronisation: the files change rarely
            self.reload()
