"""Helpers for tests that run real triphase processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from triphase.common.net import http_ok
from triphase.common.net import wait_until as wait_for

__all__ = ["http_ok", "stop", "triphase_process", "triphase_up", "wait_for"]


@contextlib.contextmanager
def triphase_process(tmp: pathlib.Path, name: str, args: list[str], timeout: float = 120,
                     env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run `triphase ARGS --ready-file ...` (with `env` added to the environment); yields (process, bound
    port); SIGTERM (then SIGKILL) on exit."""
    ready = tmp / f"{name}.port"
    log = tmp / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "triphase.cli", *args, "--ready-file", str(ready)],
                                stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    try:
        def started() -> int:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited: {log.read_text()[-2000:]}")
            return int(ready.read_text()) if ready.exists() and ready.read_text() else 0

        yield proc, wait_for(started, timeout, f"{name} to listen")
    finally:
        stop(proc, grace=30)


def stop(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def triphase_up(args: list[str], timeout: float = 240) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run `triphase up ARGS --port 0`; yields (process, base URL) once it prints its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "triphase.cli", "up", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    errors: list[str] = []  # drained as it comes: a full pipe would block the supervisor's messages
    said: list[tuple[float, str]] = []  # the same lines with when they came (monotonic), for benchmarks
    proc.said = said  # type: ignore[attr-defined]

    def drain() -> None:
        for line in proc.stderr or ():
            errors.append(line)
            said.append((time.monotonic(), line))

    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    url = None
    try:
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                stop(proc, grace=10)
                raise AssertionError(f"triphase up did not start: {''.join(errors)}") from None
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = found.group(1) if found else None
        yield proc, url
    finally:
        stop(proc, grace=60)

