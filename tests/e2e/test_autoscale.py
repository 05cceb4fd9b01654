"""`triphase up --autoscale` on sim workers: the planner, reading the Prometheus the stack starts,
starts prefill workers under a prefill-heavy load (the router serves through them, nothing fails) and
stops them once the load is gone and the stabilization window has passed."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from tests.load import load_in_background
from triphase.common.process.net import free_port
from triphase.local.processes import triphase_up, wait_for

pytestmark = pytest.mark.slow


def _value(prometheus: str, expr: str) -> float | None:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query?{query}", timeout=5) as response:
        result = json.load(response)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_the_local_planner_starts_and_stops_workers() -> None:
    port = free_port()
    prometheus = f"http://127.0.0.1:{port}"
    args = ["--engine", "sim", "--sim-prefill-per-token-ms", "1", "--sim-decode-per-seq-ms", "5", "--autoscale",
            "--prometheus-port", str(port), "--planner-interval", "2", "--stabilization", "6", "--ttft-slo", "2",
            "--max-prefill", "3"]
    ready_prefill = 'triphase_workers{role="prefill",state="ready"}'  # as the router counts them
    with triphase_up(args) as (_, url):
        wait_for(lambda: _value(prometheus, ready_prefill) == 1, 30, "the router's one prefill worker in Prometheus")
        # 8 lanes of distinct 300-token prompts: more prefill than one worker clears within the 2 s TTFT.
        with load_in_background(url, "hello " * 300, max_tokens=4, lanes=8, unique=True) as load:
            wait_for(lambda: (_value(prometheus, ready_prefill) or 0) >= 2, 90,
                     "the planner to start a prefill worker the router serves through")
        assert not load.failed, load.failed[:3]
        assert load.done
        wait_for(lambda: _value(prometheus, ready_prefill) == 1, 90,
                 "the planner to stop the extra prefill workers once idle")
        assert _value(prometheus, 'triphase_workers{role="decode",state="ready"}') == 1
