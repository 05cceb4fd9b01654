"""A child process that ends with the process that started it.

Launchers (triphase.local.processes) put their pid in TRIPHASE_PARENT_PID; a triphase command that
finds it asks the kernel for SIGTERM when that parent goes (PR_SET_PDEATHSIG), so even a SIGKILLed
test run or `triphase up` leaves no workers behind. The child does this itself, at start: doing it
between fork and exec (subprocess's preexec_fn) is unsafe in a launcher with threads, and crashed
children of the test process now and then.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PARENT_ENV = "TRIPHASE_PARENT_PID"
PR_SET_PDEATHSIG = 1


def follow_parent() -> None:
    """SIGTERM this process when the parent named in TRIPHASE_PARENT_PID exits (Linux); at once if it
    already has."""
    expected = os.environ.pop(PARENT_ENV, "")
    if not expected.isdigit():
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(expected):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
