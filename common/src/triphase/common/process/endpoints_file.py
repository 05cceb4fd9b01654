"""File discovery of workers on one machine: a text file with one `host:port` per line (`#` comments
allowed), written whole and renamed into place by whoever starts and stops workers (`triphase up
--autoscale`), and followed by the router and the role balancer (`--workers-file`).

The watcher polls the file's modification time and size; a missing or unreadable file keeps the last
endpoints (a writer between write and rename never shows an empty set)."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)
POLL_S = 0.5


def read_endpoints(path: pathlib.Path) -> list[str]:
    """The endpoints listed in `path`, sorted and without duplicates; ValueError for a line that is not
    host:port."""
    endpoints = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{path}:{number}: expected host:port, got {entry!r}")
        endpoints.add(entry)
    return sorted(endpoints)


def replace_text(path: pathlib.Path, text: str) -> None:
    """Replace a file's content at once (write a sibling, then rename over it): a reader polling it
    never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_endpoints(path: pathlib.Path, endpoints: Iterable[str]) -> None:
    replace_text(path, "".join(f"{e}\n" for e in sorted(set(endpoints))))


async def follow(path: pathlib.Path, on_change: Callable[[list[str]], None], poll_s: float = POLL_S) -> None:
    """Call `on_change(endpoints)` with the file's endpoints now and whenever they change (forever)."""
    seen: tuple[int, int] | None = None
    published: list[str] | None = None
    while True:
        try:
            stat = path.stat()
            if (stat.st_mtime_ns, stat.st_size) != seen:
                seen = (stat.st_mtime_ns, stat.st_size)
                endpoints = read_endpoints(path)
                if endpoints != published:
                    published = endpoints
                    on_change(endpoints)
        except (OSError, ValueError) as exc:
            logger.warning("Workers file %s unreadable (%s); keeping %d endpoints", path, exc, len(published or []))
        await asyncio.sleep(poll_s)  # polling the file, not synchronisation
