"""Which decode workers hand running streams over, and how many, so that streams spread evenly.

Pure: a function of the decode workers' loads (streams each runs, as the registry sees them).
The router places every new stream on the least loaded decode worker, but a running stream stays
where it started. When the decode pool grows (a role switch moved a worker in, a pod started) or a
burst landed unevenly, the old workers keep their crowd until it finishes: their streams miss the
TPOT target while the new workers idle. Streams move from the most to the least loaded worker, one
at a time in the plan, while the gap is at least `min_gap`; each source hands its share over in one
call (the worker picks which: see HandOver), and the router resumes those streams on the least
loaded workers. `min_gap` keeps a step's worth of imbalance from moving anything: a move costs the
target a prefill of the stream's context.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping


def hand_overs(loads: Mapping[str, int], min_gap: int = 4, max_moves: int = 32) -> dict[str, int]:
    """Streams each worker (by endpoint) should hand over; empty when the spread is within `min_gap`."""
    if min_gap < 2 or len(loads) < 2:
        return {}
    left = dict(loads)
    out: collections.Counter[str] = collections.Counter()
    for _ in range(max_moves):
        high = max(left, key=lambda e: (left[e], e))
        low = min(left, key=lambda e: (left[e], e))
        if left[high] - left[low] < min_gap:
            break
        left[high] -= 1
        left[low] += 1
        out[high] += 1
    return dict(out)
