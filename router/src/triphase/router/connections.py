"""Connection limits in front of the HTTP server: a cap on open connections, and deadlines for a
request's head and body to arrive.

aiohttp closes idle keep-alive connections, but not one that trickles a request in (slowloris), nor
one that opens and never speaks; every such connection holds a file descriptor and a parser. Here
each connection's bytes are followed by `HttpFraming`, a pure tracker of where the client is in its
HTTP/1.1 request stream (the head, then Content-Length bytes of body, then the next head). A head
must be complete within `head_timeout_s` of its first byte (of the connection, for the first one); a
body within `body_timeout_s` of its head. A connection that misses a deadline is answered 408 and
closed. Beyond `max_connections` a new connection is answered 503 and closed at once. Bodies sent
chunked are not followed (the handler's own read deadline covers them). A head with a line longer
than aiohttp's limit (or longer than MAX_HEAD_BYTES in all) is answered 431 here, with a JSON body
and one WARNING line, neither of which repeats a byte of it: aiohttp's own answer echoes the start of
the offending header (an API key's prefix) in its body and logs it with a traceback.

`GuardedSite` is aiohttp's `SockSite` with each connection's protocol wrapped in `GuardedProtocol`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from typing import Any, cast

from aiohttp import web

logger = logging.getLogger(__name__)

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,18})[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
MAX_HEAD_BYTES = 64 << 10  # a head longer than this is refused (431) whatever its lines
MAX_LINE_BYTES = 8190  # aiohttp's request-line and header-field limits: a longer line is refused (431) here


@dataclasses.dataclass
class HttpFraming:
    """Where a client is in its request stream: reading a head, or `body_left` bytes of body.
    `deadline` is when the current head or body must be complete (None: nothing is owed)."""

    head_timeout_s: float
    body_timeout_s: float
    deadline: float | None = None
    body_left: int = 0
    following: bool = True  # False after a chunked body: the framing is no longer known here
    too_large: bool = False  # a head with a line over MAX_LINE_BYTES, or over MAX_HEAD_BYTES: refuse it
    _head: bytearray = dataclasses.field(default_factory=bytearray)

    def opened(self, now: float) -> None:
        """A new connection owes its first head."""
        self.deadline = now + self.head_timeout_s

    def feed(self, data: bytes, now: float) -> None:
        view = memoryview(data)
        while view and self.following:
            if self.body_left:
                used = min(self.body_left, len(view))
                self.body_left -= used
                view = view[used:]
                if not self.body_left:
                    self.deadline = None  # the request is in; the next head starts with its first byte
                continue
            if not self._head:
                self.deadline = now + self.head_timeout_s if self.deadline is None else self.deadline
            start = max(0, len(self._head) - 3)
            self._head += view
            end = self._head.find(b"\r\n\r\n", start)
            if end < 0:
                line = len(self._head) - (self._head.rfind(b"\n") + 1)  # the line still arriving
                if len(self._head) > MAX_HEAD_BYTES or line > MAX_LINE_BYTES:
                    self.too_large, self.following = True, False
                return
            head, rest = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
            if max(map(len, head.split(b"\r\n"))) > MAX_LINE_BYTES:
                self.too_large, self.following = True, False
                return
            self._head.clear()
            view = memoryview(rest)
            if _CHUNKED.search(head):
                self.following, self.deadline = False, None
                return
            length = _CONTENT_LENGTH.search(head)
            self.body_left = int(length.group(1)) if length else 0
            self.deadline = now + self.body_timeout_s if self.body_left else None

    def expired(self, now: float) -> bool:
        return self.following and self.deadline is not None and now >= self.deadline


@dataclasses.dataclass
class ConnectionLimits:
    max_connections: int = 1024
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    open: int = 0  # connections counted now


def _response(status: str, message: str, kind: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


REFUSED = _response("503 Service Unavailable", "too many open connections; retry shortly", "service_unavailable")
TIMED_OUT = _response("408 Request Timeout", "the request was not received in time", "invalid_request_error")
HEAD_TOO_LARGE = _response("431 Request Header Fields Too Large",
                           f"a request line or header is longer than {MAX_LINE_BYTES} bytes, or all of them longer "
                           f"than {MAX_HEAD_BYTES}", "invalid_request_error")


class GuardedProtocol(asyncio.Protocol):
    """Counts the connection, enforces the deadlines, and hands everything else to aiohttp's protocol."""

    def __init__(self, inner: Any, limits: ConnectionLimits) -> None:
        self.inner = inner
        self.limits = limits
        self.framing = HttpFraming(limits.head_timeout_s, limits.body_timeout_s)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport: asyncio's, or uvloop's (the loop Ray Serve's replicas run), which
        # implements the same interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        if self.limits.open >= self.limits.max_connections:
            transport.write(REFUSED)
            transport.close()
            return
        self.limits.open += 1
        self.counted = True
        self.framing.opened(asyncio.get_running_loop().time())
        self._arm()
        self.inner.connection_made(transport)

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.framing.following and self.framing.deadline is not None:
            self.timer = asyncio.get_running_loop().call_at(self.framing.deadline, self._check)

    def _check(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.framing.expired(asyncio.get_running_loop().time()):
            transport.write(TIMED_OUT)
            transport.close()
        else:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        self.framing.feed(data, asyncio.get_running_loop().time())
        if self.framing.too_large and self.transport is not None:
            if not self.transport.is_closing():
                peer = self.transport.get_extra_info("peername")
                logger.warning("Refused a request from %s: a header line over %d bytes", peer and peer[0],
                               MAX_LINE_BYTES)
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()
            return  # aiohttp never sees it: its answer and its log would repeat the header
        self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        if self.counted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.counted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.limits.open -= 1
            self.counted = False
            self.inner.connection_lost(exc)


class GuardedSite(web.SockSite):
    """`web.SockSite` whose connections go through `GuardedProtocol`."""

    __slots__ = ("_limits",)

    def __init__(self, runner: web.BaseRunner, sock: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(runner, sock, **kwargs)
        self._limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        limits = self._limits
        self._server = await asyncio.get_running_loop().create_server(
            lambda: GuardedProtocol(server(), limits), sock=self._sock, backlog=self._backlog,
            ssl=self._ssl_context)
