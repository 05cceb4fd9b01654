"""Loopback helpers for local stacks (the local control plane, tests and benchmarks)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now (another process could take it before it is bound again)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port(flag: str, port: int, host: str = "127.0.0.1") -> None:
    """ValueError naming `flag` unless `port` is 0 (any free port) or in 1..65535 and can be bound on
    `host` now."""
    if not 0 <= port < 65536:
        raise ValueError(f"{flag} {port}: a port is in 1..65535 (0: any free port)")
    with socket.socket() as sock:
        # As the servers do: a port whose last connections wait in TIME_WAIT is free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port} ({error.strerror})") from None


def http_ok(url: str, timeout: float = 5.0) -> bool:
    """GET `url` answers 200 (False while it refuses or errs)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy and return that; TimeoutError after
    `timeout` seconds, naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling interval of a condition with a deadline, not synchronisation
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
