"""Admission control: a bounded FIFO queue in front of a fixed number of running slots."""

from __future__ import annotations

import asyncio

import pytest

from triphase.router.admission import Admission
from triphase.router.errors import Overloaded


async def _hold(admission: Admission, started: list[int], index: int, release: asyncio.Event) -> None:
    async with admission.slot():
        started.append(index)
        await release.wait()


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)


async def test_queue_admits_in_arrival_order_and_refuses_when_full() -> None:
    admission = Admission(max_in_flight=2, max_queued=2)
    release = [asyncio.Event() for _ in range(4)]
    started: list[int] = []
    tasks = [asyncio.create_task(_hold(admission, started, i, release[i])) for i in range(4)]
    await _until(lambda: admission.running == 2 and admission.queued == 2)
    assert started == [0, 1]

    with pytest.raises(Overloaded, match="2 queued"):  # queue full: refused at once
        async with admission.slot():
            pass

    release[1].set()  # a finished request hands its slot to the oldest waiter
    await _until(lambda: started == [0, 1, 2])
    assert admission.running == 2 and admission.queued == 1
    for event in release:
        event.set()
    await asyncio.gather(*tasks)
    assert started == [0, 1, 2, 3]
    assert admission.running == 0 and admission.queued == 0


async def test_waiting_too_long_is_a_429_and_frees_the_queue_place() -> None:
    admission = Admission(max_in_flight=1, max_queued=1, max_wait_s=0.05)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(admission, [], 0, release))
    await _until(lambda: admission.running == 1)
    with pytest.raises(Overloaded, match="waited"):
        async with admission.slot():
            pass
    assert admission.queued == 0
    release.set()
    await holder
    assert admission.running == 0


async def test_a_cancelled_waiter_loses_its_place_and_leaks_no_slot() -> None:
    admission = Admission(max_in_flight=1, max_queued=4)
    release = asyncio.Event()
    started: list[int] = []
    holder = asyncio.create_task(_hold(admission, started, 0, release))
    await _until(lambda: admission.running == 1)
    gone = asyncio.create_task(_hold(admission, started, 1, asyncio.Event()))
    later = asyncio.create_task(_hold(admission, started, 2, release))
    await _until(lambda: admission.queued == 2)
    gone.cancel()  # the client disconnected while queued
    await _until(gone.done)
    assert admission.queued == 1
    release.set()
    await asyncio.gather(holder, later)
    assert started == [0, 2]
    assert admission.running == 0


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        Admission(max_in_flight=0, max_queued=1)
