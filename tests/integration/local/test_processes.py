"""Processes started through triphase.local.processes end with the process that started them, even
when it is SIGKILLed (nothing can clean up after it then)."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from triphase.local.processes import wait_for

pytestmark = pytest.mark.slow
PARENT = """
import pathlib, sys, threading, time
from triphase.local.processes import start_triphase
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()  # a launcher with threads
proc, port = start_triphase(pathlib.Path(sys.argv[1]), "worker", [
    "worker", "--engine", "sim", "--port", "0", "--kv-cache-mib", "16", "--kv-transfer", "grpc"], timeout=120)
print(proc.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_launcher_takes_its_children(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running() and child.ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 60,
                 "the worker to exit after its launcher was killed")
    finally:
        parent.kill()
        parent.wait()
