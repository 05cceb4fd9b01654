"""Process supervision for the local stack: children started, watched and restarted.

Each child is a `triphase` subcommand run with `--ready-file` (it writes its bound port there once
serving). A child that exits while the stack runs is restarted on the port it had, so the router's
worker endpoints and the printed URL stay valid. One that dies before it is ready again is crash
looping: its restarts back off, doubling from RESTART_BACKOFF_S up to MAX_BACKOFF_S; one that had
become ready (or ran STABLE_S) is restarted after RESTART_BACKOFF_S. This is what Kubernetes
does for a pod's container; a worker whose engine dies exits 1 for exactly this. Children are started
by `triphase.local.processes`, so even a `kill -9` of the supervisor leaves no orphans behind.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import subprocess
import time
from collections.abc import Callable

from triphase.common.errors import UserError
from triphase.local.processes import TRIPHASE, log_tail, ready_port, spawn, stop_all

RESTART_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STABLE_S = 60.0
POLL_S = 0.2


@dataclasses.dataclass
class Child:
    name: str
    args: list[str]  # a triphase command line with its `--port`
    proc: subprocess.Popen[bytes] | None = None
    port: int | None = None  # bound on the first start, reused by every restart
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = RESTART_BACKOFF_S
    restart_at: float | None = None  # set while it is down and waiting to be restarted
    announced: bool = True  # its (re)start has been reported ready


class Supervisor:
    def __init__(self, tmp: pathlib.Path, say: Callable[[str], None]) -> None:
        self.tmp = tmp
        self.say = say
        self.children: dict[str, Child] = {}
        self.retired: list[subprocess.Popen[bytes]] = []  # retired children still draining

    def ready_file(self, child: Child) -> pathlib.Path:
        return self.tmp / f"{child.name}.port"

    def spawn(self, name: str, args: list[str]) -> Child:
        child = self.children[name] = Child(name, args)
        self._start(child)
        return child

    def _start(self, child: Child) -> None:
        ready = self.ready_file(child)
        ready.unlink(missing_ok=True)
        args = list(child.args)
        if child.port is not None:
            args[args.index("--port") + 1] = str(child.port)
        child.proc = spawn([*TRIPHASE, *args, "--ready-file", str(ready)], self.tmp / f"{child.name}.log",
                           append=True)
        child.started_at = time.monotonic()

    def wait_ready(self, child: Child, deadline: float) -> int:
        while time.monotonic() < deadline:
            if (port := ready_port(self.ready_file(child))) is not None:
                child.port = port
                return port
            if child.proc is not None and child.proc.poll() is not None:
                raise UserError(f"{child.name} exited with code {child.proc.returncode}: {self.tail(child)}")
            time.sleep(0.1)  # polling a child's ready file, bounded by the deadline
        raise UserError(f"{child.name} was not ready in time (log: {self.tmp / (child.name + '.log')})")

    def tail(self, child: Child, lines: int = 5) -> str:
        return log_tail(self.tmp / f"{child.name}.log", lines)

    def supervise(self, until: Callable[[], bool] = lambda: False, tick: Callable[[], None] | None = None) -> None:
        """Restart children that exit, until `until()` is true (or forever: Ctrl-C ends it); `tick()` runs
        on every pass, in this thread (where children may be spawned and retired)."""
        while not until():
            self.check()
            if tick is not None:
                tick()
            self.retired = [proc for proc in self.retired if proc.poll() is None]
            time.sleep(POLL_S)  # supervising: wake up to notice a child that died

    def check(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            proc = child.proc
            if proc is None:
                continue
            if child.restart_at is None and proc.poll() is not None:
                if child.announced or now - child.started_at > STABLE_S:  # it served: not a crash loop
                    child.backoff_s = RESTART_BACKOFF_S
                child.restart_at = now + child.backoff_s
                self.say(f"{child.name} exited with code {proc.returncode}; restarting in {child.backoff_s:g} s "
                         f"({self.tail(child, 1)})")
                child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
            elif child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                child.announced = False
                self._start(child)
            elif not child.announced and ready_port(self.ready_file(child)) is not None:
                child.announced = True
                self.say(f"{child.name} is back on port {child.port} (restart {child.restarts})")

    def retire(self, name: str) -> subprocess.Popen[bytes] | None:
        """SIGTERM a child (it drains its requests and exits) and stop supervising it: it is not restarted.
        Returns its process, for the caller to reap."""
        child = self.children.pop(name, None)
        if child is None or child.proc is None:
            return None
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        self.retired.append(child.proc)
        return child.proc

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (they drain), SIGKILL what is left after `grace_s`."""
        stop_all([c.proc for c in reversed(self.children.values()) if c.proc is not None] + self.retired, grace_s)
