"""`triphase up`: the whole local stack (router + prefill + decode workers) on 127.0.0.1.

Starts each worker and the router as child processes, shows progress while the model loads, prints
the URL and a curl example, and stops every child on Ctrl-C or SIGTERM. Children also get
PR_SET_PDEATHSIG, so even a `kill -9` of this process leaves no orphans behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from triphase.common.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="router port")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    parser.add_argument("--model", help="GGUF file or Hugging Face directory (default: bundled SmolLM2-135M)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--engine", default="torch", choices=["torch", "sim"],
                        help="sim: workers with a timing model instead of the model (no weights loaded)")
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="per worker")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the stack to be ready")


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _say(message: str) -> None:
    sys.stderr.write(f"triphase up: {message}\n")
    sys.stderr.flush()


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="triphase-up-"))

    def spawn(self, name: str, args: list[str]) -> pathlib.Path:
        ready = self.tmp / f"{name}.port"
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (owned by the child for its lifetime)
        proc = subprocess.Popen([sys.executable, "-m", "triphase.cli", *args, "--ready-file", str(ready)],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.children.append((name, proc))
        return ready

    def wait_ready(self, name: str, ready: pathlib.Path, deadline: float) -> int:
        proc = dict(self.children)[name]
        while time.monotonic() < deadline:
            if ready.exists() and ready.read_text():
                return int(ready.read_text())
            if proc.poll() is not None:
                tail = (self.tmp / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise UserError(f"{name} exited with code {proc.returncode}: {' | '.join(tail)}")
            time.sleep(0.1)  # polling a child's ready file, bounded by the deadline
        raise UserError(f"{name} was not ready in time (log: {self.tmp / (name + '.log')})")

    def stop(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(args: argparse.Namespace) -> int:
    stack = Stack()
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        deadline = time.monotonic() + args.timeout
        common = ["--dtype", args.dtype, "--kv-cache-mib", str(args.kv_cache_mib), "--engine", args.engine]
        if args.model:
            common += ["--model", args.model]
        names = [(f"prefill-{i}", "prefill") for i in range(args.prefill)]
        names += [(f"decode-{i}", "decode") for i in range(args.decode)]
        if not names or args.decode + args.prefill == 0:
            raise UserError("at least one worker is needed")
        if args.decode == 0:
            names = [(n, "both") if r == "prefill" else (n, r) for n, r in names]
        _say(f"starting {len(names)} workers ({args.prefill} prefill, {args.decode} decode); loading the model ...")
        readies = {name: stack.spawn(name, ["worker", "--role", role, "--port", "0", *common]) for name, role in names}
        endpoints = []
        for name, ready in readies.items():
            port = stack.wait_ready(name, ready, deadline)
            endpoints.append(f"127.0.0.1:{port}")
            _say(f"{name} ready on 127.0.0.1:{port}")
        router_args = ["router", "--workers", ",".join(endpoints), "--port", str(args.port)]
        if args.model:
            router_args += ["--model", args.model]
        port = stack.wait_ready("router", stack.spawn("router", router_args), deadline)
        url = f"http://127.0.0.1:{port}"
        model = _wait_ready(url, deadline)
        sys.stdout.write(
            f"\ntriphase is serving {model} at {url}/v1  (logs: {stack.tmp})\n\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
            "Ctrl-C stops everything.\n")
        sys.stdout.flush()
        while all(proc.poll() is None for _, proc in stack.children):
            time.sleep(0.5)  # supervising: wake up to notice a child that died
        dead = [name for name, proc in stack.children if proc.poll() is not None]
        raise UserError(f"{', '.join(dead)} exited unexpectedly (logs: {stack.tmp})")
    except KeyboardInterrupt:
        _say("stopping")
        return 0
    finally:
        stack.stop()


def _wait_ready(url: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as models:
                        return str(json.load(models)["data"][0]["id"])
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)  # polling the router's readiness, bounded by the deadline
    raise UserError("the router did not become ready in time")
