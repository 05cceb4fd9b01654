"""The KV cache allocation (anonymous memory, huge pages where offered): zeroed, the requested shape
and dtype, writable, and alive as long as the tensor is, with no other reference to its memory."""

from __future__ import annotations

import gc

import torch

from triphase.workers.engine.model_runner import allocate_kv


def test_allocate_kv_is_a_zeroed_writable_tensor_that_owns_its_memory():
    kv = allocate_kv((3, 2, 16, 4), torch.bfloat16)
    assert kv.shape == (3, 2, 16, 4) and kv.dtype == torch.bfloat16 and kv.is_contiguous()
    assert not kv.any()
    gc.collect()  # nothing but the tensor refers to the mapping now
    kv[1].fill_(2.5)
    assert kv.float().sum().item() == 2.5 * 2 * 16 * 4
    assert kv[0].abs().sum().item() == 0 and kv[2].abs().sum().item() == 0
