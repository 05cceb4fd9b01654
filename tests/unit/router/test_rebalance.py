"""The stream-rebalancing rule: how many streams each crowded decode worker hands over."""

from __future__ import annotations

import pytest

from triphase.router.policy.rebalance import hand_overs


@pytest.mark.parametrize(("loads", "gap", "expected"), [
    ({"a": 10, "b": 2}, 4, {"a": 3}),  # 10/2 -> 7/5: within the gap
    ({"a": 10, "b": 0, "c": 0}, 4, {"a": 5}),  # 10/0/0 -> 5/3/2 (each move from the highest to the lowest)
    ({"a": 5, "b": 2}, 4, {}),  # a gap of 3: nothing moves
    ({"a": 6, "b": 2}, 4, {"a": 1}),  # 6/2 -> 5/3
    ({"a": 9, "b": 9, "c": 1}, 4, {"a": 2, "b": 2}),  # both crowded workers give: 7/7/5
    ({"a": 100, "b": 0}, 4, {"a": 32}),  # at most max_moves per round
    ({"a": 10}, 4, {}),  # one worker: nowhere to go
    ({"a": 10, "b": 0}, 0, {}),  # off
])
def test_hand_overs(loads: dict[str, int], gap: int, expected: dict[str, int]) -> None:
    assert hand_overs(loads, gap) == expected
