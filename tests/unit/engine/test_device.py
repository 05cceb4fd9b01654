"""Device selection and GPU KV sizing: pure functions, tested on any machine."""

from __future__ import annotations

import pytest
import torch

from triphase.common.errors import UserError
from triphase.workers.engine.device import (
    GPU_RESERVE_BYTES,
    gpu_kv_bytes,
    parse_device,
    resolve_device,
    step_reserve_bytes,
)

MiB = 1 << 20


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", " CUDA:1 "])
def test_device_specs_that_parse(spec):
    assert parse_device(spec) == spec.strip().lower()


@pytest.mark.parametrize("spec", ["", "gpu", "cuda:", "cuda:-1", "cuda:1234", "mps", "cpu:0", "cuda:0,1"])
def test_device_specs_refused_with_the_choices(spec):
    with pytest.raises(UserError, match=r"unknown device .*auto, cpu, cuda or cuda:N"):
        parse_device(spec)


def test_auto_is_the_first_cuda_device_else_the_cpu():
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_cuda_device_that_is_not_there_fails_in_one_line():
    if torch.cuda.is_available():  # a machine with GPUs: an index past them
        with pytest.raises(UserError, match=r"--device cuda:999: only \d+ CUDA device\(s\) are visible"):
            resolve_device("cuda:999")
    else:
        with pytest.raises(UserError, match=r"--device cuda:1: torch sees no CUDA device here .*use --device cpu"):
            resolve_device("cuda:1")


def test_kv_budget_is_the_fraction_of_free_memory_less_the_step_reserve():
    assert gpu_kv_bytes(free_bytes=70_000 * MiB, fraction=0.9, reserve_bytes=1000 * MiB) == 62_000 * MiB
    # workers sharing a GPU each take their share of what is free when they size
    assert gpu_kv_bytes(free_bytes=70_000 * MiB, fraction=0.45, reserve_bytes=1000 * MiB) == 30_500 * MiB


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, float("nan")])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(UserError, match="--gpu-memory-fraction must be in"):
        gpu_kv_bytes(free_bytes=1 << 30, fraction=fraction, reserve_bytes=0)


def test_no_room_left_names_the_numbers_and_the_ways_out():
    with pytest.raises(UserError, match=r"1000 MiB free after the weights, x 0.5 = 500 MiB, and a step needs 600 MiB"):
        gpu_kv_bytes(free_bytes=1000 * MiB, fraction=0.5, reserve_bytes=600 * MiB)


def test_the_step_reserve_grows_with_the_token_budget_and_the_batch():
    model = {"hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152, "compute_bytes": 2}
    small = step_reserve_bytes(max_batched_tokens=512, max_num_seqs=64, **model)
    assert small > GPU_RESERVE_BYTES
    assert step_reserve_bytes(max_batched_tokens=4096, max_num_seqs=64, **model) > small
    assert step_reserve_bytes(max_batched_tokens=512, max_num_seqs=256, **model) > small
    # SmolLM2-135M, 512 tokens, 64 sequences: the reserve is a few tens of MiB above the fixed part
    assert small - GPU_RESERVE_BYTES == 512 * (4 * 576 * 3 + 2 * 1536 * 3) + 4 * 49152 * 64 * 2
