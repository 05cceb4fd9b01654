"""RoleState: the admission gate and a switch's drain and hand-over, without a server."""

from __future__ import annotations

import asyncio

import pytest

from triphase.common.roles import Role
from triphase.workers.roles import Refused, RoleState


def test_the_gate_refuses_by_state_and_role() -> None:
    state = RoleState("w", Role.PREFILL)
    state.admit("r", "ok", needs_prefill=True)
    with pytest.raises(Refused) as refused:
        state.admit("r", "ok", needs_decode=True)
    assert not refused.value.transient and "is prefill, not decode" in str(refused.value)
    with pytest.raises(Refused) as refused:
        state.admit("r", "stalled", needs_prefill=True)
    assert refused.value.transient
    state.switching = True
    with pytest.raises(Refused) as refused:
        state.admit("r", "ok", needs_prefill=True)
    assert refused.value.transient  # the router tries another worker at once
    with pytest.raises(ValueError):
        state.admit("x" * 257, "ok")


async def test_a_switch_waits_for_streams_then_hands_over_the_rest() -> None:
    changes = []
    state = RoleState("w", Role.DECODE, on_change=lambda: changes.append(state.switching))
    interrupted: list[str] = []

    def interrupt(request_id: str, reason: str) -> bool:
        interrupted.append(request_id)
        asyncio.get_running_loop().call_soon(finish, request_id)  # the stream ends at its next step
        return True

    def finish(request_id: str) -> None:
        state.streams.pop(request_id, None)
        state.stream_done.set()

    state.streams.update({"quick": (10, 10, True), "slow": (10, 10, True)})
    asyncio.get_running_loop().call_later(0.05, finish, "quick")
    previous, handed = await state.switch(Role.PREFILL, 0.3, interrupt)
    assert (previous, handed, interrupted) == (Role.DECODE, 1, ["slow"])
    assert state.role is Role.PREFILL and not state.switching and changes == [True, False]
    assert await state.switch(Role.PREFILL, 0.3, interrupt) == (Role.PREFILL, 0)  # already there


async def test_only_one_switch_at_a_time() -> None:
    state = RoleState("w", Role.PREFILL)
    with state.prefilling():
        first = asyncio.create_task(state.switch(Role.DECODE, 5.0, lambda rid, why: False))
        await asyncio.sleep(0)  # let it start waiting for the prefill
        assert state.switching
        with pytest.raises(Refused):
            await state.switch(Role.DECODE, 0.0, lambda rid, why: False)
    assert await first == (Role.PREFILL, 0) and state.role is Role.DECODE


def test_streams_to_move_are_the_newest_within_bounds() -> None:
    state = RoleState("w", Role.DECODE)
    for rid, prompt, new in [("old", 100, 200), ("long-prompt", 5000, 200), ("short", 100, 8), ("new", 100, 200),
                             ("newest", 50, 100), ("resumed", 50, 100)]:  # resumed here: moved once already
        state.streams[rid] = (prompt, new, rid != "resumed")
    assert state.movable(2, max_context_tokens=4096, min_new_tokens=16) == ["newest", "new"]
    assert state.movable(9, max_context_tokens=4096, min_new_tokens=16) == ["newest", "new", "old"]
    state.switching = True  # a switch hands over on its own terms
    assert state.movable(9, 4096, 16) == []
    prefill = RoleState("p", Role.PREFILL)
    prefill.streams["queued"] = (100, 200, True)  # a prefill worker holds prompts, not streams to hand over
    assert prefill.movable(9, 4096, 16) == []
