"""Client API keys: who may use the OpenAI API, and the name their requests are counted under.

The key file (a mounted Secret's key on Kubernetes, `triphase up --api-key` locally) holds one key per
line, optionally after a name: `team-a sk-...`; `#` starts a comment. A key without a name is counted
as `key-<first 8 hex of its sha256>`, so metrics never show a key itself. Clients send
`Authorization: Bearer <key>` (what the OpenAI clients send). The presented key is hashed and compared
with every stored key's hash in constant time, all of them, so neither timing nor order says which
keys exist. The file is read again when it changes (checked at most every `reload_s`): keys are added
and revoked without a restart, and a file that became unreadable or empty keeps the keys in force
(a rotation half done must not open the API or lock everyone out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import pathlib
import re
import time

from triphase.common.errors import UserError
from triphase.router.errors import Unauthorized

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 512  # a longer Authorization header is refused before it is hashed
MAX_KEYS = 10_000


@dataclasses.dataclass(frozen=True)
class _Key:
    name: str
    digest: bytes


def parse(text: str, source: str = "the key file") -> list[_Key]:
    """The keys of a key file's text; UserError naming the line of the first bad one."""
    keys: list[_Key] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and not NAME.fullmatch(parts[0])):
            raise UserError(f"{source} line {number}: expected `KEY` or `NAME KEY` (a name is letters, digits, "
                            f"`_.-`, at most 63)")
        key = parts[-1]
        if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not key.isprintable():
            raise UserError(f"{source} line {number}: a key is {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable "
                            f"characters")
        digest = hashlib.sha256(key.encode()).digest()
        keys.append(_Key(parts[0] if len(parts) == 2 else f"key-{digest.hex()[:8]}", digest))
    if len(keys) > MAX_KEYS:
        raise UserError(f"{source}: {len(keys)} keys; at most {MAX_KEYS}")
    return keys


class ApiKeys:
    def __init__(self, path: pathlib.Path, *, reload_s: float = 2.0) -> None:
        self.path = path
        self.reload_s = reload_s
        self._stamp: tuple[int, int, int] | None = None
        self._keys = self._load()
        if not self._keys:
            raise UserError(f"{path} holds no API key")
        self._checked = time.monotonic()

    def _load(self) -> list[_Key]:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the API key file {self.path}: {exc}") from None
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return parse(text, str(self.path))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return
        self._checked = now
        try:
            st = self.path.stat()
            if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
                return
            keys = self._load()
        except UserError as exc:
            logger.error("Keeping the API keys in force: %s", exc)
            return
        if not keys:
            logger.error("Keeping the API keys in force: %s now holds none", self.path)
            return
        self._keys = keys
        logger.info("API keys reloaded from %s: %d keys", self.path, len(keys))

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> str:
        """The name of the key an `Authorization` header carries; Unauthorized when it carries none of ours."""
        self._refresh()
        if not authorization:
            raise Unauthorized("this API needs a key: send `Authorization: Bearer <key>`")
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented or len(presented) > MAX_KEY_CHARS:
            raise Unauthorized("send the API key as `Authorization: Bearer <key>`")
        digest = hashlib.sha256(presented.encode(errors="surrogateescape")).digest()
        found = ""
        for key in self._keys:  # every key, no early exit
            if hmac.compare_digest(key.digest, digest):
                found = key.name
        if not found:
            raise Unauthorized("incorrect API key provided")
        return found
