"""Shared by the benchmarks: start triphase workers and routers as processes on 127.0.0.1."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import urllib.request

from triphase.common.net import free_port

TRIPHASE = [sys.executable, "-m", "triphase.cli"]


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)  # polling a condition with a deadline
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start(args: list[str], log_path: pathlib.Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def worker(tmp: pathlib.Path, name: str, args: list[str], env: dict[str, str] | None = None,
           timeout: float = 180) -> tuple[subprocess.Popen[bytes], str]:
    """A `triphase worker`; returns (process, host:port) once it listens."""
    ready = tmp / f"{name}.port"
    proc = start([*TRIPHASE, "worker", "--port", "0", "--ready-file", str(ready), *args], tmp / f"{name}.log", env)
    wait_until(lambda: proc.poll() is None and ready.exists() and ready.read_text(), timeout, f"worker {name}")
    return proc, f"127.0.0.1:{ready.read_text()}"


def router(tmp: pathlib.Path, endpoints: list[str], args: list[str] = (),  # type: ignore[assignment]
           timeout: float = 60) -> tuple[subprocess.Popen[bytes], str]:
    """A `triphase router` over `endpoints`; returns (process, base URL) once it is ready."""
    port = free_port()
    proc = start([*TRIPHASE, "router", "--workers", ",".join(endpoints), "--port", str(port), *args],
                 tmp / "router.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/readyz"), timeout, "the router")
    return proc, url


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
