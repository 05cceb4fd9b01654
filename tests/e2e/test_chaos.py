"""The short chaos run (the long one: benchmarks/chaos.py). A `triphase up` stack on the real model
serves a bounded load while its workers are SIGKILLed in turn and `triphase up` restarts them: no
request fails and every greedy output equals the fault-free one. The router SIGKILLed under load:
clients in flight get clean connection errors, the router comes back on its port, and no worker is
left holding KV."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import urllib.request

import pytest

from tests.chaos import PROMPTS, Killer, all_idle, children, load, rss_mib
from triphase.local.processes import http_ok, triphase_up, up_bundle, wait_for

pytestmark = pytest.mark.slow
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def stack():
    with triphase_up(["--dtype", "float32", "--prefill", "1", "--decode", "2", "--kv-cache-mib", "64"]) as (proc, url):
        fault_free = asyncio.run(load(url, len(PROMPTS), 4, MAX_TOKENS))
        assert all(o.text for o in fault_free), fault_free
        yield {"proc": proc, "url": url, "expected": {o.index: o.text for o in fault_free}}


def test_workers_killed_in_turn_under_load_lose_no_request(stack):
    proc, url = stack["proc"], stack["url"]
    router = children(proc.pid)["router"]
    baseline = rss_mib(router)
    killer = Killer(proc.pid, 6.0, ["prefill-0", "decode-0", "prefill-0", "decode-1"])
    killer.start()
    try:
        outcomes = asyncio.run(load(url, 40, 4, MAX_TOKENS))
    finally:
        killer.stop()
    assert len(killer.kills) >= 3, killer.kills
    assert [o for o in outcomes if o.text is None] == []
    assert [o.index for o in outcomes if o.text != stack["expected"][o.index]] == []
    wait_for(lambda: all_idle(url, up_bundle(proc)), 60, "every worker back, holding no KV")
    assert rss_mib(router) < baseline * 1.25 + 20  # the router survived it all, without growing


def test_a_rolling_restart_under_load_loses_nothing(stack):
    """SIGTERM each worker in turn, as a rollout does, the next once the previous is back: each drains
    (NOT_SERVING, in-flight streams finish), exits 0 and is started again."""
    proc, url = stack["proc"], stack["url"]
    rolled: list[str] = []

    def roll() -> None:
        for victim in ("prefill-0", "decode-0", "decode-1"):
            old = children(proc.pid)[victim]
            old.send_signal(signal.SIGTERM)
            old.wait(timeout=60)  # drains, then exits (with 0: test_lifecycle.py)
            wait_for(lambda name=victim: name in children(proc.pid) and all_healthy(url), 90, f"{victim} back")
            rolled.append(victim)

    roller = threading.Thread(target=roll, daemon=True)
    roller.start()
    outcomes = []
    while roller.is_alive() and len(outcomes) < 400:  # bounded: the roll's own deadlines end it
        outcomes += asyncio.run(load(url, 8, 4, MAX_TOKENS))
    roller.join()
    assert rolled == ["prefill-0", "decode-0", "decode-1"]
    assert [o for o in outcomes if o.text is None] == []
    assert [o.index for o in outcomes if o.text != stack["expected"][o.index]] == []


def all_healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
        return all(w["healthy"] for w in json.load(response)["workers"])


def test_the_router_killed_under_load_comes_back_and_leaks_nothing(stack):
    proc, url = stack["proc"], stack["url"]
    router = children(proc.pid)["router"]
    done: list[int] = []
    killed = threading.Event()

    def kill_after_some(n: int) -> None:
        done.append(n)
        if n == 4 and not killed.is_set():
            killed.set()
            router.kill()

    outcomes = asyncio.run(load(url, 16, 4, MAX_TOKENS, progress=kill_after_some))
    assert killed.is_set()
    failures = [o.error for o in outcomes if o.text is None]
    assert failures and all(e.startswith(("APIConnectionError", "APITimeoutError")) for e in failures), failures
    assert all(o.text == stack["expected"][o.index] for o in outcomes if o.text is not None)
    wait_for(lambda: http_ok(f"{url}/readyz"), 60, "the router back on its port")
    again = asyncio.run(load(url, 8, 4, MAX_TOKENS))
    assert all(o.text == stack["expected"][o.index] for o in again), again
    wait_for(lambda: all_idle(url, up_bundle(proc)), 60,
             "no worker holding KV (pins of the dead router's requests expire)")
