"""What one request can do to an engine: numbers that used to break the sampler, a step that
raises (only its requests fail, the engine steps on), repeated failures (the engine is declared dead,
every caller hears it), and a step that never returns (health says "stalled" until it does)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from triphase.local.processes import wait_for
from triphase.workers.engine.async_engine import AsyncEngine, EngineFailed
from triphase.workers.engine.core import EngineConfig, KvExport
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.engine.sim import SimTiming, simulated_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.slow
def test_a_denormal_temperature_is_greedy(make_engine, chat_prompt_ids):
    engine = make_engine()
    greedy = engine.generate([chat_prompt_ids[0]], SamplingParams(max_tokens=12, temperature=0))[0]
    tiny = engine.generate([chat_prompt_ids[0]], SamplingParams(max_tokens=12, temperature=1e-40))[0]
    assert tiny.token_ids == greedy.token_ids


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"seed": 1 << 70}, "seed"),
    ({"stop": tuple(f"s{i}" for i in range(17))}, "stop strings"),
    ({"stop": ("x" * 257,)}, "stop strings"),
    ({"stop_token_ids": tuple(range(65))}, "stop token ids"),
])
def test_sampling_numbers_are_bounded(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.fixture
def engine():
    """A simulated engine (real bookkeeping, no model) whose runner the tests make fail or hang."""
    return simulated_engine(None, EngineConfig(num_kv_blocks=64), SimTiming(0, 0, 0, 0))


class Faults:
    """Wraps a runner's execute: raises for steps that schedule a request named `poison*`, or holds
    a step until `release` is set when `hold` is."""

    def __init__(self, runner) -> None:
        self.execute = runner.execute
        self.hold = threading.Event()
        self.release = threading.Event()
        runner.execute = self

    def __call__(self, plan):
        if self.hold.is_set():
            self.release.wait(timeout=30)
        if any(i.request.request_id.startswith("poison") for i in plan.scheduled):
            raise RuntimeError("injected step failure")
        return self.execute(plan)


async def collect(runner: AsyncEngine, request_id: str, prompt: list[int]) -> list[int]:
    tokens: list[int] = []
    async for out in runner.generate(request_id, prompt, GREEDY):
        tokens += out.new_token_ids
    return tokens


async def test_stats_are_true_from_the_start_and_refreshed_while_idle(engine):
    runner = AsyncEngine(engine)
    runner.start()
    try:
        first = runner.stats  # before any request: every block free (it said 0 of 0)
        assert (first.free_blocks, first.total_blocks) == (64, 64) and first.running == 0
        # idle, yet its stats are read again (the engine thread replaces the snapshot)
        await asyncio.to_thread(wait_for, lambda: runner.stats is not first, 5, "an idle stats refresh")
        assert runner.stats.total_blocks == 64
    finally:
        await runner.stop()


async def test_a_failed_step_fails_only_its_requests(engine):
    faults = Faults(engine.runner)
    runner = AsyncEngine(engine, max_step_failures=3)
    runner.start()
    try:
        expected = await collect(runner, "before", [5, 6, 7])
        with pytest.raises(EngineFailed, match="failed while computing"):
            await collect(runner, "poison-1", [5, 6, 7])
        assert await collect(runner, "after", [5, 6, 7]) == expected  # the engine stepped on
        assert runner.health() == "ok" and runner.step_failures == 1
        assert engine.kv.num_free_blocks == engine.layout.num_blocks  # nothing leaked
        # A prefill-only request is failed the same way (no pin is left behind).
        with pytest.raises(EngineFailed):
            await runner.prefill("poison-2", [5, 6, 7], GREEDY)
        assert not engine.scheduler.pinned and engine.kv.num_free_blocks == engine.layout.num_blocks
    finally:
        faults.release.set()
        await runner.stop()


async def test_failures_in_a_row_kill_the_engine_and_every_caller_hears_it(engine):
    Faults(engine.runner)
    runner = AsyncEngine(engine, max_step_failures=2)
    runner.start()
    try:
        for i in range(2):
            with pytest.raises(EngineFailed):
                await collect(runner, f"poison-{i}", [1, 2, 3])
        await asyncio.to_thread(wait_for, lambda: runner.health() == "dead", 10, "the engine to be dead")
        with pytest.raises(EngineFailed, match="stopped"):
            await collect(runner, "later", [1, 2, 3])
        with pytest.raises(EngineFailed):
            await runner.release("nothing")
    finally:
        await runner.stop()


async def test_a_step_that_never_returns_is_stalled_until_it_does(engine):
    faults = Faults(engine.runner)
    runner = AsyncEngine(engine, stall_timeout_s=0.5)
    runner.start()
    try:
        faults.hold.set()
        stream = asyncio.ensure_future(collect(runner, "slow", [4, 5]))
        await asyncio.to_thread(wait_for, lambda: runner.health() == "stalled", 10, "a stalled engine")
        faults.hold.clear()
        faults.release.set()
        assert len(await asyncio.wait_for(stream, 10)) == GREEDY.max_tokens
        assert runner.health() == "ok"
    finally:
        faults.release.set()
        await runner.stop()


def test_an_import_is_checked_before_anything_is_allocated(engine):
    layout = dataclasses.replace(engine.layout, num_blocks=1)
    prompt = list(range(1, 11))
    vocab = engine.model_config.vocab_size
    cases = [
        (KvExport("a", layout, [0], 10, vocab), "first_token_id"),  # the Decode reproduction
        (KvExport("b", layout, [0, 1], 10, 7), "cannot hold"),
        (KvExport("c", layout, [0], 9, 7), "tokens, prompt has"),
    ]
    for export, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.reserve_import(export.request_id, prompt, GREEDY, export)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.reserve_import("d", [vocab + 5] * 10, GREEDY, KvExport("d", layout, [0], 10, 7))
    assert engine.kv.num_free_blocks == engine.layout.num_blocks


async def test_a_prefill_export_and_its_release_do_not_wait_for_the_step_in_progress(engine):
    """The hand-off's latency: a prefilled request's export comes with its output (not after the
    next step), and ReleaseKv is answered while another request's long step is still running (the
    decode worker commits its copy on that answer)."""
    faults = Faults(engine.runner)
    runner = AsyncEngine(engine)
    runner.start()
    try:
        export, first = await runner.prefill("a", [1, 2, 3, 4], GREEDY)
        assert export.num_tokens == 4 and export.first_token_id == first.new_token_ids[0]
        faults.hold.set()  # every step from now on runs until the test lets it go
        held = asyncio.ensure_future(runner.prefill("b", [5, 6, 7], GREEDY))
        await asyncio.to_thread(wait_for, lambda: engine.scheduler.running, 10, "b's step to be running")
        assert await asyncio.wait_for(runner.release("a"), 5) is True
        assert await runner.release("a") is False  # released once
        faults.release.set()
        export_b, _ = await asyncio.wait_for(held, 10)
        assert export_b.num_tokens == 3
        await asyncio.to_thread(wait_for, lambda: "a" not in engine.scheduler.pinned, 10, "a's blocks to be freed")
    finally:
        faults.release.set()
        await runner.stop()
