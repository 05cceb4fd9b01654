"""Where the engine computes, and how much KV memory a GPU gives it.

`--device auto` is the first visible CUDA device when torch sees one, else the CPU; `cuda` and `cuda:N`
insist on a GPU and fail with one line when there is none (a pod that asked for `nvidia.com/gpu` and
landed without one must not quietly decode on its CPU). Only `resolve_device` asks torch anything;
the parsing and the sizing are pure, so they are tested on machines without a GPU.

KV sizing on a GPU follows what users know from vLLM's `--gpu-memory-utilization`, with one
difference that matters when workers share a GPU (prefill and decode on one card): the fraction
applies to the memory that is *free* once this worker's weights are resident, not to the card's
total. From that share the engine keeps back what a step needs beyond the KV (activations of a full
token budget, the logits of a full batch), and the rest is KV blocks. An explicit `--kv-cache-mib`
(the CRD's `engine.kvCacheMib`) wins over the sizing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from triphase.common.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")
DEFAULT_CPU_KV_MIB = 512  # the CPU default when --kv-cache-mib is not given
GPU_RESERVE_BYTES = 256 << 20  # allocator fragmentation and workspace the estimate below leaves out


def parse_device(spec: str) -> str:
    """Validate a `--device` value (returned as given, lower-cased)."""
    value = spec.strip().lower()
    if not _DEVICE.fullmatch(value):
        raise UserError(f"unknown device {spec!r} (choose {DEVICE_CHOICES})")
    return value


def resolve_device(spec: str) -> torch.device:
    """The torch device `spec` names on this machine; `auto` prefers the first CUDA device."""
    import torch

    value = parse_device(spec)
    if value == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {value}: torch sees no CUDA device here (torch {torch.__version__}, built for "
                        f"CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
    index = int(value.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {value}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def step_reserve_bytes(*, max_batched_tokens: int, max_num_seqs: int, hidden_size: int, intermediate_size: int,
                       vocab_size: int, compute_bytes: int) -> int:
    """Memory one step needs besides the weights and the KV: the float32 residual stream and the widest
    intermediate (gate|up, then their product) of a full token budget, and float32 logits of a full batch
    (argmax or a copy to the host). An over-estimate by design: running out mid-step fails a batch."""
    per_token = 4 * hidden_size * 3 + compute_bytes * intermediate_size * 3
    logits = 4 * vocab_size * max(max_num_seqs, 1) * 2
    return max_batched_tokens * per_token + logits + GPU_RESERVE_BYTES


def check_fraction(fraction: float) -> float:
    """A --gpu-memory-fraction: in (0, 1] (NaN is not)."""
    if not 0 < fraction <= 1:
        raise UserError(f"--gpu-memory-fraction must be in (0, 1], got {fraction}")
    return fraction


def gpu_kv_bytes(*, free_bytes: int, fraction: float, reserve_bytes: int) -> int:
    """KV bytes from the memory free after the weights: `fraction` of it, less the step reserve."""
    budget = int(free_bytes * check_fraction(fraction)) - reserve_bytes
    if budget <= 0:
        raise UserError(f"no GPU memory left for the KV cache: {free_bytes / 2**20:.0f} MiB free after the weights, "
                        f"x {fraction} = {free_bytes * fraction / 2**20:.0f} MiB, and a step needs "
                        f"{reserve_bytes / 2**20:.0f} MiB besides; raise --gpu-memory-fraction, lower "
                        "--max-batched-tokens, or set --kv-cache-mib")
    return budget
