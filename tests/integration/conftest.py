"""Shared by the integration tests: a `triphase worker --engine sim` (5 ms steps) per module."""

from __future__ import annotations

import pytest

from triphase.local.processes import log_tail, triphase_process


@pytest.fixture(scope="module")
def sim_endpoint(tmp_path_factory):
    """The worker's host:port; it must stop cleanly (exit code 0) when the module is done."""
    tmp = tmp_path_factory.mktemp("sim")
    with triphase_process(tmp, "sim", ["worker", "--engine", "sim", "--port", "0", "--sim-prefill-ms", "5",
                                       "--sim-decode-ms", "5", "--kv-cache-mib", "64"]) as (proc, port):
        yield f"127.0.0.1:{port}"
    assert proc.returncode == 0, log_tail(tmp / "sim.log", 40, "\n")
