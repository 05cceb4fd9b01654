"""Every query of every shipped dashboard returns data from a real Prometheus scraping a running
`triphase up` under load (sim workers, role balancer and planner on, the SLO rules the operator would
write loaded). The dashboards' variables are set to what the local stack is labelled with
(namespace "local", deployment "local"), as a user would pick them; $__rate_interval to 10 s."""

from __future__ import annotations

import json
import pathlib
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.load import load_in_background
from triphase.common.process.net import free_port
from triphase.local.processes import triphase_up, wait_for

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))


def _queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel or annotation title, PromQL) of every dashboard."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            out += [(path.stem, panel["title"], t["expr"]) for t in panel.get("targets", [])]
        out += [(path.stem, a["name"], a["expr"]) for a in board.get("annotations", {}).get("list", []) if "expr" in a]
    return out


def _result(prometheus: str, expr: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query?{query}", timeout=10) as response:
        return json.load(response)["data"]["result"]


def _bad_request(url: str) -> None:
    body = json.dumps({"model": "nope", "prompt": "hi"}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code in (400, 404)


def test_every_dashboard_query_returns_data_from_the_running_stack() -> None:
    queries = _queries()
    assert {p.stem for p in DASHBOARDS} == {"slo-overview", "pools-control", "kv-transfer", "engine"}
    assert len(queries) >= 30
    port = free_port()
    prometheus = f"http://127.0.0.1:{port}"
    args = ["--engine", "sim", "--prefill", "1", "--decode", "2", "--sim-prefill-per-token-ms", "1",
            "--sim-decode-per-seq-ms", "5", "--role-switching", "--autoscale", "--prometheus-port", str(port),
            "--planner-interval", "2", "--stabilization", "6", "--ttft-slo", "2", "--max-prefill", "3",
            "--min-decode", "2"]  # two decode workers stay, so the balancer has one to move (an annotation)
    with triphase_up(args) as (_, url):
        variables = {"$namespace": "local", "$deployment": "local", "$model": ".*", "$__rate_interval": "10s"}

        def resolved(expr: str) -> str:
            for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            return expr

        missing: list[tuple[str, str, str]] = list(queries)
        # Distinct 300-token prompts on 8 lanes: more prefill than one worker clears in the TTFT target, so
        # the balancer moves a decode worker and the planner adds prefill workers (their annotations).
        with load_in_background(url, "hello " * 300, max_tokens=8, lanes=8, unique=True) as load:
            _bad_request(url)  # an error code for "Errors by code"

            asked = [0.0]

            def all_answer() -> bool:
                if time.monotonic() - asked[0] < 1.0:  # each query at most once a second (scrapes are 1 s apart)
                    return False
                asked[0] = time.monotonic()
                missing[:] = [q for q in missing if not _result(prometheus, resolved(q[2]))]
                return not missing

            try:
                wait_for(all_answer, 150, "every dashboard query to return data")
            except TimeoutError:
                raise AssertionError(f"no data for {[(d, t) for d, t, _ in missing]}") from None
        assert not load.failed, load.failed[:3]
        # The variables' own queries find the local stack's values.
        for label, value in (("namespace", "local"), ("triphase_dev_deployment", "local")):
            query = urllib.parse.urlencode({"match[]": "triphase_requests_total"})
            with urllib.request.urlopen(f"{prometheus}/api/v1/label/{label}/values?{query}", timeout=10) as response:
                assert value in json.load(response)["data"]
