"""Which memory a worker's KV is in, which NIXL build moves it, and when a NIXL READ may run."""

from __future__ import annotations

import torch

from triphase.workers.kv.nixl import DRAM, VRAM, backend_module, can_read, memory_of


def test_host_tensors_are_dram():
    assert memory_of(torch.zeros(4)) == (DRAM, 0)


def test_a_read_runs_only_between_memories_of_one_kind():
    assert can_read(DRAM, DRAM) and can_read(VRAM, VRAM)
    assert can_read(DRAM, "")  # a peer from before the field: host memory
    assert not can_read(VRAM, DRAM) and not can_read(DRAM, VRAM) and not can_read(VRAM, "")


def test_the_nixl_build_matches_torchs_cuda_major_version():
    major = (torch.version.cuda or "").partition(".")[0]
    assert major, "the torch wheel the project installs is a CUDA build"
    assert backend_module() == f"nixl_cu{major}"
