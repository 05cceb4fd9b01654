"""One local Ray instance and `serve run` on it, for the Ray Serve tests and benchmarks/rayserve.py.

`ray start --head` on 127.0.0.1 with a GCS port of its own (and no dashboard); `serve run CONFIG`
as a child process, stopped with SIGINT as a user's Ctrl-C stops it. `RAY_ADDRESS` points both (and
a driver in this process) at the instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psutil
import yaml

from triphase.common.process.net import free_port, wait_until

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "deploy" / "ray" / "serve.yaml"
BIN = pathlib.Path(sys.executable).parent
REPLICA = "ServeReplica:"  # Ray names each replica's process ray::ServeReplica:<app>:<deployment>


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run([str(BIN / "ray"), *args], check=True, env=env, capture_output=True, timeout=120)


@contextlib.contextmanager
def local_ray(tmp: pathlib.Path, cpus: int = 8) -> Iterator[dict[str, str]]:
    """A head node on 127.0.0.1; yields the environment that reaches it. `cpus` is Ray's logical count
    (what replicas' num_cpus are counted against), not a limit on the machine's two cores."""
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_USAGE_STATS_ENABLED": "0"}
    _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(cpus),
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(tmp), env=env)
    try:
        yield env
    finally:
        _ray("stop", "--force", env=env)


def config(tmp: pathlib.Path, port: int, **args: Any) -> pathlib.Path:
    """deploy/ray/serve.yaml with the proxy on `port` and `args` merged into the application's args."""
    data = yaml.safe_load(SERVE_YAML.read_text())
    data["http_options"]["port"] = port
    app_args = data["applications"][0]["args"]
    for key, value in args.items():
        app_args[key] = {**app_args.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"serve-{port}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ready_workers(url: str) -> list[dict[str, Any]]:
    """The workers the router lists as healthy ([] while it is not ready)."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return [w for w in json.load(response)["workers"] if w["healthy"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return []


def _interruptible() -> None:
    """SIGINT back to its default in the child: a test run started in the background of a shell inherits
    it ignored, and Python then leaves it ignored, so Ctrl-C (our SIGINT) would never reach `serve run`."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def serve_run(path: pathlib.Path, env: dict[str, str], log: pathlib.Path, workers: int,
              timeout: float = 300) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`serve run PATH` until `workers` workers serve behind the router; yields (process, base URL).
    Stopped with SIGINT (Ctrl-C) unless the test stopped it."""
    port = yaml.safe_load(path.read_text())["http_options"]["port"]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "serve"), "run", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=_interruptible)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve run exited {proc.returncode}: {log.read_text()[-3000:]}")
            return len(ready_workers(url)) >= workers

        wait_until(up, timeout, f"{workers} workers behind the Ray Serve ingress")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def replica_processes() -> list[psutil.Process]:
    """This machine's Serve replica processes."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if any(REPLICA in part for part in proc.info["cmdline"] or []):
                found.append(proc)
    return found


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still alive after `timeout` seconds."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive
