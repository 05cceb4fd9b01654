"""Starting and stopping triphase processes on 127.0.0.1: the one launcher behind `triphase up`'s
supervisor, the tests and the benchmarks.

A triphase server started with `--ready-file PATH` writes its bound port there once it serves, so
`--port 0` works everywhere and nothing has to guess a free port. Each child writes its output to
`<dir>/<name>.log`; what a failure says includes that log's tail. Children are told this process's
pid (triphase.common.process.lifetime): a launcher that dies (even of SIGKILL) takes its children with it.
"""

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
from collections.abc import Iterable, Iterator

from triphase.common.process.lifetime import PARENT_ENV
from triphase.common.process.net import http_ok, wait_until
from triphase.common.security import mtls

__all__ = ["TRIPHASE", "http_ok", "log_tail", "ready_port", "spawn", "start_triphase", "stop", "stop_all",
           "triphase_process", "triphase_up", "up_bundle", "wait_for", "wait_until"]

TRIPHASE = [sys.executable, "-m", "triphase.cli"]
wait_for = wait_until  # the name the tests use


def _child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}


def spawn(argv: list[str], log: pathlib.Path, env: dict[str, str] | None = None,
          append: bool = False) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr to `log` (appended to with `append`, as a restart does) and
    `env` added to this process's environment."""
    with open(log, "ab" if append else "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_child_env(env))


def ready_port(ready: pathlib.Path) -> int | None:
    """The port a server wrote to its ready file, or None while it has not."""
    try:
        text = ready.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def log_tail(log: pathlib.Path, lines: int = 5, sep: str = " | ") -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return sep.join(text[-lines:])


def start_triphase(tmp: pathlib.Path, name: str, args: list[str], env: dict[str, str] | None = None,
                   timeout: float = 180) -> tuple[subprocess.Popen[bytes], int]:
    """Run `triphase ARGS --ready-file tmp/NAME.port` (output in tmp/NAME.log); returns (process, bound
    port) once it serves. The caller stops it (`stop`, `stop_all`)."""
    ready = tmp / f"{name}.port"
    log = tmp / f"{name}.log"
    ready.unlink(missing_ok=True)
    proc = spawn([*TRIPHASE, *args, "--ready-file", str(ready)], log, env)

    def started() -> int:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with code {proc.returncode}: {log_tail(log, 40, chr(10))}")
        return ready_port(ready) or 0

    try:
        return proc, wait_until(started, timeout, f"{name} to listen (log: {log})")
    except BaseException:
        stop(proc, grace=10)
        raise


@contextlib.contextmanager
def triphase_process(tmp: pathlib.Path, name: str, args: list[str], timeout: float = 120,
                     env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`start_triphase` as a context: yields (process, bound port); SIGTERM (then SIGKILL) on exit."""
    proc, port = start_triphase(tmp, name, args, env, timeout)
    try:
        yield proc, port
    finally:
        stop(proc, grace=30)


def up_bundle(proc: subprocess.Popen[str], identity: str = "control") -> mtls.Bundle | None:
    """The mTLS bundle of `identity` in a `triphase_up` stack (None when it runs without mTLS): what a
    test or a tool talks to the stack's workers with."""
    directory = proc.logs / "mtls" / identity  # type: ignore[attr-defined]
    return mtls.Bundle(directory) if directory.is_dir() else None


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float) -> None:
    """SIGTERM (a triphase server drains), then SIGKILL if it has not exited after `grace` seconds."""
    stop_all([proc], grace)


def stop_all(procs: Iterable[subprocess.Popen[bytes] | subprocess.Popen[str]], grace: float = 30) -> None:
    """SIGTERM every process at once, SIGKILL those still running `grace` seconds later."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def triphase_up(args: list[str], timeout: float = 240) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run `triphase up ARGS --port 0`; yields (process, base URL) once it prints its URL, and SIGTERMs it
    (it drains and stops its children) when the block ends. The process carries `said`: its stderr lines
    with when they came (time.monotonic()), for benchmarks, and `logs`: the stack's directory (its mTLS
    bundles are under logs/mtls/<identity>, see `up_bundle`)."""
    proc = subprocess.Popen([*TRIPHASE, "up", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_child_env())
    lines: queue.Queue[str] = queue.Queue()
    said: list[tuple[float, str]] = []  # drained as it comes: a full pipe would block the supervisor
    proc.said = said  # type: ignore[attr-defined]

    def pump() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    def drain() -> None:
        for line in proc.stderr or ():
            said.append((time.monotonic(), line))

    threading.Thread(target=pump, daemon=True).start()
    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    url = None
    try:
        while url is None:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if proc.poll() is None and time.monotonic() < deadline:
                    continue
                stop(proc, grace=10)
                raise AssertionError(f"triphase up did not start: {''.join(text for _, text in said)}") from None
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1 +\(logs: (.+)\)", line)
            if found:
                url = found.group(1)
                proc.logs = pathlib.Path(found.group(2))  # type: ignore[attr-defined]
        yield proc, url
    finally:
        stop(proc, grace=60)
