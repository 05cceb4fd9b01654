"""The NIXL KV connector: decode workers READ prefilled blocks straight out of the prefill
worker's KV tensor (UCX backend; on one host it moves bytes process to process, no copy through
the control plane).

Each worker registers its whole KV tensor once with its own NIXL agent and publishes the agent's
metadata, the tensor's base address and its memory kind (DRAM, or VRAM with the CUDA device index:
UCX then moves GPU to GPU, cuda_ipc on one node, RDMA across nodes) in the KvTransferParams of every
prefill. The receiver adds
the remote agent (once per peer), turns (source blocks -> destination blocks) into as few
contiguous byte ranges as `transfer_plan` allows, posts one READ and polls it to completion. The
prefill side learns nothing from NIXL itself: the receiver acknowledges with ReleaseKv, as with
the gRPC connector, and only then are the source blocks freed.

A READ runs only between memories of one kind (`can_read`): a GPU worker and a CPU worker hand off
through the gRPC stream, which stages through (pinned) host memory on both ends, never a NIXL
descriptor of the wrong kind. Which NIXL build is loaded is the `nixl` meta package's choice: the
build for torch's CUDA major version (`backend_module`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from triphase.workers.engine.kv_layout import KvLayout, transfer_plan

logger = logging.getLogger(__name__)


PROGRESS_DELAY_US = int(os.environ.get("TRIPHASE_NIXL_PTHR_DELAY", "100"))


@contextlib.contextmanager
def _progress_delay(microseconds: int) -> Iterator[None]:
    """Give the agent's UCX progress thread a pause between idle polls.

    NIXL's `nixl_agent` always configures `pthrDelay = 0`, which makes that thread spin: every
    NIXL-enabled worker burnt about 94 % of a core while idle. The binding's config object has the
    field, but the Python agent builds it internally, so the config is adjusted as it is handed to
    the binding, for the duration of this construction only."""
    from nixl import _api

    make = _api.nixlBind.nixlAgent

    def with_delay(name: str, config: Any) -> Any:
        config.pthrDelay = microseconds
        return make(name, config)

    _api.nixlBind.nixlAgent = with_delay
    try:
        yield
    finally:
        _api.nixlBind.nixlAgent = make


def interface_of(host: str) -> str | None:
    """The network interface holding `host`'s address (an IP or a name), or None when none here does."""
    import psutil

    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] in wanted for a in addresses):
            return str(name)
    return None


def bind_ucx(host: str) -> str | None:
    """Keep UCX's listening sockets to the interface peers reach this worker on (`host`, the address its
    KV tickets name): UCX otherwise listens on every interface (see docs/security.md, "The KV
    side-channel"). Must run before the first NIXL agent is made; a UCX_NET_DEVICES already set (an
    RDMA device list, say) is left alone. Returns the devices UCX will use (None: all)."""
    if "UCX_NET_DEVICES" not in os.environ and (device := interface_of(host)) is not None:
        os.environ["UCX_NET_DEVICES"] = device
    return os.environ.get("UCX_NET_DEVICES")


class NixlUnavailable(Exception):
    """NIXL could not be initialised or a transfer failed; the caller falls back to gRPC."""


DRAM, VRAM = "DRAM", "VRAM"


def memory_of(tensor: torch.Tensor) -> tuple[str, int]:
    """NIXL's memory kind of a tensor and its device index (0 for host memory)."""
    return (VRAM, tensor.device.index or 0) if tensor.device.type == "cuda" else (DRAM, 0)


def can_read(local_memory: str, remote_memory: str) -> bool:
    """Whether a NIXL READ may move remote bytes into local ones: same kind of memory only (an empty
    remote kind is a peer from before the field existed: DRAM)."""
    return local_memory == (remote_memory or DRAM)


def backend_module() -> str:
    """The NIXL build the meta package loaded (nixl_cu12, nixl_cu13, ...)."""
    from nixl import _api

    return _api.__name__.partition(".")[0]


class NixlConnector:
    def __init__(self, name: str, kv_cache: torch.Tensor, layout: KvLayout) -> None:
        try:
            from nixl import nixl_agent, nixl_agent_config
        except ImportError as exc:  # pragma: no cover - the dependency is declared
            raise NixlUnavailable(f"nixl is not installed ({exc})") from None
        try:
            with _progress_delay(PROGRESS_DELAY_US):
                self.agent: Any = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
            if "UCX" not in self.agent.backends:
                raise NixlUnavailable("the UCX backend is not available")
            self.agent.register_memory(kv_cache)
        except NixlUnavailable:
            raise
        except Exception as exc:  # NIXL raises plain RuntimeErrors from its bindings
            raise NixlUnavailable(f"NIXL initialisation failed: {exc}") from None
        self.name = name
        self.kv_cache = kv_cache
        self.layout = layout
        self.memory, self.device_id = memory_of(kv_cache)
        self.backend = backend_module()
        self.base_address = kv_cache.data_ptr()
        self.metadata: bytes = self.agent.get_agent_metadata()
        self._peers: dict[bytes, str] = {}

    def register(self, tensor: torch.Tensor) -> None:
        """Make another local buffer readable by peers and writable by reads (an embedding cache).
        Before the worker serves: the agent metadata peers get (`metadata`) then names it too."""
        try:
            self.agent.register_memory(tensor)
            self.metadata = self.agent.get_agent_metadata()
        except Exception as exc:  # NIXL raises plain RuntimeErrors from its bindings
            raise NixlUnavailable(f"NIXL registration failed: {exc}") from None

    def read(self, remote_metadata: bytes, remote_base: int, remote_blocks: Sequence[int],
             local_blocks: Sequence[int], timeout_s: float = 30.0, *, remote_memory: str = DRAM,
             remote_device: int = 0) -> int:
        """Copy remote blocks into local ones (blocking; run it off the event loop). Returns bytes."""
        if not can_read(self.memory, remote_memory):
            raise NixlUnavailable(f"the source's KV is in {remote_memory or DRAM}, ours in {self.memory}")
        bb = self.layout.block_bytes
        plan = transfer_plan(remote_blocks, local_blocks)
        return self.read_ranges(remote_metadata, [(remote_base + s * bb, self.base_address + d * bb, n * bb)
                                                  for s, d, n in plan], timeout_s,
                                memory=self.memory, local_device=self.device_id, remote_device=remote_device)

    def read_ranges(self, remote_metadata: bytes, ranges: Sequence[tuple[int, int, int]],
                    timeout_s: float = 30.0, *, memory: str = DRAM, local_device: int = 0,
                    remote_device: int = 0) -> int:
        """READ each (remote address, local address, bytes) range of registered memory of kind `memory`
        on both sides, as one transfer (blocking; run it off the event loop). Returns the bytes moved."""
        try:
            peer = self._peers.get(remote_metadata)
            if peer is None:
                peer = self.agent.add_remote_agent(remote_metadata)
                if isinstance(peer, bytes):
                    peer = peer.decode()
                self._peers[remote_metadata] = peer
            local = self.agent.get_xfer_descs([(dst, n, local_device) for _, dst, n in ranges], memory)
            remote = self.agent.get_xfer_descs([(src, n, remote_device) for src, _, n in ranges], memory)
            handle = self.agent.initialize_xfer("READ", local, remote, peer)
        except Exception as exc:
            raise NixlUnavailable(f"NIXL transfer set-up failed: {exc}") from None
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + timeout_s
            while state == "PROC" and time.monotonic() < deadline:
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlUnavailable(f"NIXL READ ended in state {state}")
        finally:
            handle.release()
        return sum(n for _, _, n in ranges)
