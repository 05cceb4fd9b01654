"""Serve's HTTP requests into the router that runs inside the ingress replica, and its answers back.

The router is the one `triphase router` runs (router/main.py `start`): aiohttp, with its admission,
body and header limits, API keys, metrics and streaming. Serve hands the ingress a Starlette request;
rather than a second web-framework edge for the same API, the replica forwards it over loopback to
its router and streams the answer back chunk by chunk (Server-Sent Events included). The price is
one loopback HTTP exchange per request, measured in BENCHMARKS.md "Ray Serve". A client that goes
away cancels the forwarding, which closes the loopback connection, which cancels the router's
handler and so the request on its workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

# Hop-by-hop headers (RFC 9110 7.6.1) and those the two HTTP stacks set themselves.
SKIPPED = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                     "upgrade", "host", "content-length"})


class Forwarder:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False)

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[int, list[tuple[str, str]], AsyncIterator[bytes]]:
        """The router's status, headers and body chunks for one request."""
        url = f"{self.base}{path}" + (f"?{query}" if query else "")
        sent = [(k, v) for k, v in headers if k.lower() not in SKIPPED]
        response = await self.session.request(method, url, headers=sent, data=body, allow_redirects=False)
        kept = [(k, v) for k, v in response.headers.items() if k.lower() not in SKIPPED]
        return response.status, kept, _chunks(response)

    async def close(self) -> None:
        await self.session.close()


async def _chunks(response: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    finally:
        if response.content.at_eof():
            response.release()  # back to the pool
        else:
            response.close()  # the client went away: closing the connection cancels the router's handler
