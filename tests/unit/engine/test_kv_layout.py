"""KV layout: block byte ranges and the grouping of blocks into contiguous transfers."""

import pytest

from triphase.workers.engine.kv_layout import KvLayout, contiguous_runs, transfer_plan


def layout(**kw):
    return KvLayout(**{"num_blocks": 10, "num_layers": 30, "block_size": 16, "num_kv_heads": 3,
                       "head_dim": 64, "dtype": "float32", **kw})


def test_block_bytes_and_ranges():
    lay = layout()
    assert lay.block_bytes == 30 * 2 * 16 * 3 * 64 * 4 == 737280
    assert lay.block_range(0) == (0, 737280)
    assert lay.block_range(3) == (3 * 737280, 737280)
    assert lay.total_bytes == 10 * 737280
    assert lay.shape == (10, 30, 2, 16, 3, 64)
    with pytest.raises(IndexError):
        lay.block_range(10)


def test_contiguous_runs():
    assert contiguous_runs([4, 5, 6, 9, 2, 3]) == [(4, 3), (9, 1), (2, 2)]
    assert contiguous_runs([]) == []


def test_transfer_plan_needs_contiguity_on_both_sides():
    assert transfer_plan([4, 5, 6, 7], [0, 1, 5, 6]) == [(4, 0, 2), (6, 5, 2)]
    assert transfer_plan([1, 2, 3], [7, 8, 9]) == [(1, 7, 3)]
    with pytest.raises(ValueError):
        transfer_plan([1], [1, 2])


def test_compatibility_ignores_capacity_only():
    assert layout().compatible_with(layout(num_blocks=99))
    assert not layout().compatible_with(layout(dtype="bfloat16"))
    with pytest.raises(ValueError):
        layout(dtype="int3")
