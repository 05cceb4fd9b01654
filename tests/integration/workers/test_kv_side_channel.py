"""The KV side-channel: NIXL's UCX listens for peers' READs. It authenticates nobody, so it listens on
the interface the hand-off needs only (the worker's advertised address), not on every one."""

from __future__ import annotations

import ipaddress
import os
import pathlib

import pytest

from triphase.local.processes import start_triphase, stop

pytestmark = pytest.mark.slow


def listening_addresses(pid: int) -> set[str]:
    """The local addresses of the TCP sockets process `pid` listens on."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    found = set()
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order
                ordered = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(ordered)))
    return found


def test_a_nixl_worker_listens_on_its_advertised_interface_only(tmp_path):
    proc, _ = start_triphase(tmp_path, "worker", ["worker", "--engine", "sim", "--port", "0", "--kv-cache-mib",
                                                  "16", "--kv-transfer", "nixl"], timeout=120)
    try:
        addresses = listening_addresses(proc.pid)
        log = (tmp_path / "worker.log").read_text()
    finally:
        stop(proc, grace=30)
    assert len(addresses) >= 2  # gRPC, and UCX's own listener
    assert all(loopback(a) for a in addresses), addresses  # it listened on every interface
    assert "NIXL from DRAM" in log and "UCX listens on lo only" in log


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
