"""`triphase up --role-switching`: the role balancer moves workers as the load shifts, losing nothing.

Sim workers (2 prefill + 2 decode; 1 ms per prompt token, 10 ms + 5 ms per stream per decode step)
under a prompt-heavy load, then a decode-heavy one: a decode worker becomes a prefill worker, then
a worker goes back to decode, each within the reaction target, and every request completes.
The real model (1 prefill + 2 decode) under the same two loads, with greedy chat completions
running throughout: the balancer switches a worker each way, and every greedy output equals the
one the stack gave before any switch.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from tests.chaos import PROMPTS, Outcome, load
from tests.load import Load
from triphase.local.processes import triphase_up

SIM = ["--engine", "sim", "--prefill", "2", "--decode", "2", "--sim-prefill-per-token-ms", "1",
       "--sim-decode-per-seq-ms", "5", "--role-switching", "--ttft-slo", "2", "--tpot-slo", "0.05",
       "--switch-cooldown", "5", "--max-switches-per-minute", "6"]
REACTION_S = 10.0  # the target, from the load shift to the switch


def roles(url: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
        return {w["endpoint"]: w["role"] for w in json.load(response)["workers"]}


def count(url: str, role: str) -> int:
    return sum(1 for r in roles(url).values() if r == role)


async def wait_until(condition, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    """Seconds until `condition()` held (polled off the event loop); fails after `timeout_s`."""
    started = time.monotonic()
    while not await asyncio.to_thread(condition):
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(0.25)  # polling the router's view of the roles, bounded by the deadline
    return time.monotonic() - started


async def test_roles_follow_a_load_that_shifts_from_prompts_to_generations() -> None:
    with triphase_up(SIM, timeout=120) as (_, url):
        assert (count(url, "prefill"), count(url, "decode")) == (2, 2)

        # Prompt-heavy: 16 clients sending ~3000-token prompts for 4 tokens each; the two prefill
        # workers (1000 tokens/s each) build a backlog far above the 2 s TTFT target.
        prompts = Load(url, "hello " * 3000, max_tokens=4, lanes=16)
        seen: list[dict[str, str]] = []

        def switched_to_prefill() -> bool:
            seen.append(roles(url))
            return list(seen[-1].values()).count("prefill") == 3

        took = await wait_until(switched_to_prefill, REACTION_S + 20)
        await prompts.stop()
        assert took <= REACTION_S, f"a decode worker became a prefill worker after {took:.1f} s"
        assert list(seen[-1].values()).count("decode") == 1  # min-per-role kept the last one
        assert not prompts.failed, prompts.failed[:3]
        assert prompts.done and all(n == 4 for n in prompts.done)

        # Decode-heavy: 24 streams of 200 tokens on the one decode worker take 130 ms a step,
        # above the 50 ms TPOT target, while the prefill workers idle.
        generations = Load(url, "hi", max_tokens=200, lanes=24)
        took = await wait_until(lambda: count(url, "decode") >= 2, REACTION_S + 20)
        await generations.stop()
        assert took <= REACTION_S, f"a prefill worker became a decode worker after {took:.1f} s"
        assert not generations.failed, generations.failed[:3]
        assert generations.done and all(n == 200 for n in generations.done)


# Tight SLOs for a 2-core CPU, so that a saturated pool is hot whatever this machine's speed; no grace,
# so a switching worker hands its streams over at once (the router resumes them elsewhere).
REAL = ["--dtype", "float32", "--prefill", "1", "--decode", "2", "--kv-cache-mib", "64", "--role-switching",
        "--ttft-slo", "0.5", "--tpot-slo", "0.03", "--switch-cooldown", "2", "--max-switches-per-minute", "30",
        "--switch-grace", "0"]
CHECKED_TOKENS = 32


@pytest.mark.slow
async def test_switches_on_the_real_model_keep_greedy_outputs_equal() -> None:
    with triphase_up(REAL) as (_, url):
        before = await load(url, len(PROMPTS), 1, CHECKED_TOKENS)  # one at a time: nothing to balance
        assert (count(url, "prefill"), count(url, "decode")) == (1, 2)
        assert all(o.text for o in before), before
        expected = {o.index: o.text for o in before}
        checked: list[Outcome] = []
        stop = asyncio.Event()

        async def greedy_throughout() -> None:
            while not stop.is_set():
                checked.extend(await load(url, 2, 2, CHECKED_TOKENS))

        checker = asyncio.create_task(greedy_throughout())
        # Long prompts of their own (no prefix-cache hits) for 2 tokens each saturate the prefill worker.
        prompts = Load(url, "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 120,
                       max_tokens=2, lanes=4, unique=True)
        await wait_until(lambda: count(url, "prefill") == 2, 120)
        await prompts.stop()
        # Many generations saturate the one decode worker left.
        generations = Load(url, "Tell me a long story about a turtle.", max_tokens=64, lanes=8)
        await wait_until(lambda: count(url, "decode") == 2, 120)
        await generations.stop()
        stop.set()
        await asyncio.wait_for(checker, timeout=120)
        assert not prompts.failed and not generations.failed, (prompts.failed + generations.failed)[:3]
        assert checked and [o for o in checked if o.text is None] == []
        assert [(o.index, o.text) for o in checked if o.text != expected[o.index]] == []
