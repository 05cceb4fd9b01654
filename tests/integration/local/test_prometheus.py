"""The local Prometheus: built from the Go module proxy, it scrapes a `triphase up --prometheus` stack
and answers the queries the planner and the dashboards make; its configuration passes promtool."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from triphase.common.process.net import free_port, wait_until
from triphase.local import command, prometheus
from triphase.local.processes import triphase_up


def test_the_scrape_configuration_passes_promtool(tmp_path) -> None:
    config = prometheus.scrape_config({"router": ["127.0.0.1:8000"], "worker": ["127.0.0.1:9001", "127.0.0.1:9002"],
                                       "balancer": []}, interval_s=0.5)
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    checked = subprocess.run([prometheus.ensure(progress=False).promtool, "check", "config", str(path)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert [job["job_name"] for job in config["scrape_configs"]] == ["router", "worker"]  # no empty job


@pytest.mark.parametrize("spec", ["router", "=127.0.0.1:1", "router=", "router=localhost"])
def test_a_bad_scrape_target_is_a_one_line_error(spec: str) -> None:
    with pytest.raises(ValueError, match="JOB=HOST:PORT"):
        command.jobs_from([spec])
    proc = subprocess.run([sys.executable, "-m", "triphase.cli", "prometheus", "up", "--scrape", spec],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "JOB=HOST:PORT" in proc.stderr


def series(url: str, expr: str) -> list[dict]:  # type: ignore[type-arg]
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=5) as response:
        return list(json.load(response)["data"]["result"])


def test_triphase_up_prometheus_scrapes_the_router_the_workers_and_the_balancer() -> None:
    port = free_port()
    args = ["--engine", "sim", "--prefill", "1", "--decode", "1", "--role-switching", "--ttft-slo", "2",
            "--tpot-slo", "0.1", "--prometheus", "--prometheus-port", str(port)]
    with triphase_up(args) as (_, url):
        models = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=10))
        body = json.dumps({"model": models["data"][0]["id"], "prompt": "hello", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        prom = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(series(prom, 'up{job=~"router|worker|balancer"} == 1')) == 4, 30,
                   "the router, both workers and the balancer scraped")
        wait_until(lambda: series(prom, 'sum(triphase_requests_total{status="ok"}) >= 1'), 30,
                   "the request counted in Prometheus")
        roles = {s["metric"]["role"] for s in series(prom, "triphase_worker_running_requests")}
        assert roles == {"prefill", "decode"}
        assert series(prom, 'triphase_balancer_workers{role="decode"} == 1')
        # One served name on every component's series, so dashboards and rules can join on `model`.
        by_job = series(prom, 'count by (job, model) ({__name__=~"triphase_.+", model!=""})')
        assert {s["metric"]["job"] for s in by_job} == {"router", "worker", "balancer"}
        assert {s["metric"]["model"] for s in by_job} == {models["data"][0]["id"]}
