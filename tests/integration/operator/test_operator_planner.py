"""The planner on a real control plane with a real Prometheus: sim workers and a router run on 127.0.0.1,
Prometheus scrapes them with the labels a PodMonitor would add, and the operator (as its ServiceAccount)
plans the deployment's pools from what Prometheus measured. Raising the load grows the prefill pool on
the API server; after the load stops the pool returns to its minimum once the stabilization window has
passed; stopping Prometheus leaves the replicas alone and says so in the SLOMet condition. The decode
capacity comes from a profile in a ConfigMap once it exists."""

from __future__ import annotations

import contextlib
import copy
import urllib.request

import pytest

from tests.integration.operator.helpers import SAMPLE, apply, kubectl_json, operator
from tests.load import load_in_background
from triphase.common import labels
from triphase.common.process.net import free_port
from triphase.common.profile import Profile
from triphase.local import prometheus
from triphase.local.processes import triphase_process, wait_for
from triphase.operator.planning import PROFILE_KEY

pytestmark = pytest.mark.slow
SIM = ["--engine", "sim", "--sim-prefill-per-token-ms", "1", "--sim-decode-per-seq-ms", "5"]


def _replicas(kube, pool):
    return kubectl_json(kube, "get", "servingpool", pool)["spec"]["replicas"]


def _condition(kube, name, type_):
    status = kubectl_json(kube, "get", "tsd", name).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def _events(kube, reason):
    items = kubectl_json(kube, "get", "events", "--field-selector", f"reason={reason}")["items"]
    return [e["message"] for e in items]


def test_the_planner_sizes_pools_from_prometheus(kube, operator_account, tmp_path):
    name = "planned"
    with contextlib.ExitStack() as stack:
        scraped = {}
        endpoints = []
        for worker, role in [("p0", "prefill"), ("d0", "decode")]:
            scraped[worker] = free_port()
            _, port = stack.enter_context(triphase_process(tmp_path, worker, [
                "worker", "--role", role, "--port", "0", "--metrics-port", str(scraped[worker]), *SIM]))
            endpoints.append(f"127.0.0.1:{port}")
        _, router_port = stack.enter_context(triphase_process(tmp_path, "router", [
            "router", "--workers", ",".join(endpoints), "--port", "0"]))
        jobs = {"router": [f"127.0.0.1:{router_port}"], "worker": [f"127.0.0.1:{p}" for p in scraped.values()]}
        server = prometheus.Prometheus(prometheus.scrape_config(jobs, labels={
            "namespace": kube.namespace, labels.PROMETHEUS_DEPLOYMENT: name}), workdir=tmp_path / "prometheus")
        stack.enter_context(server)
        _, _ = stack.enter_context(operator(tmp_path, operator_account))
        metrics_port = int((tmp_path / "operator.port.metrics").read_text())

        spec = copy.deepcopy(SAMPLE)
        spec["metadata"]["name"] = name
        spec["spec"]["pools"]["prefill"].update(replicas=1, minReplicas=1, maxReplicas=3)
        spec["spec"]["pools"]["decode"].update(replicas=1, minReplicas=1, maxReplicas=3)
        spec["spec"]["slo"] = {"ttftSeconds": 2.0, "tpotSeconds": 0.1, "percentile": 90, "attainmentTarget": 0.9}
        spec["spec"]["autoscaling"] = {"enabled": True, "intervalSeconds": 5, "prometheusUrl": server.url,
                                       "stabilizationSeconds": 15, "profileConfigMap": f"{name}-profile"}
        apply(kube, spec)
        wait_for(lambda: (_condition(kube, name, "SLOMet") or {}).get("reason") == "NoTraffic", 60,
                 "the planner's first interval (no requests yet)")
        assert _replicas(kube, f"{name}-prefill") == 1

        # The profile it names does not exist yet: it says so, and fits; once made, it is used.
        wait_for(lambda: f"ConfigMap {name}-profile not found; capacity comes from what the workers report"
                 in _events(kube, "ProfileUnusable"), 30, "a Warning that the profile is missing")
        profile = Profile.fit([(100, 0.1), (200, 0.2)], [(1, 0, 0.007), (2, 0, 0.012), (4, 0, 0.022)],
                              model="smollm2", engine="sim")
        made = tmp_path / PROFILE_KEY
        profile.save(made)
        kube.kubectl("create", "configmap", f"{name}-profile", f"--from-file={made}")
        loaded = wait_for(lambda: _events(kube, "ProfileLoaded"), 30, "the planner to load the profile")
        assert loaded == [f"Capacity from ConfigMap {name}-profile (smollm2, engine sim): 19.6 decode streams per "
                          "worker at the 0.1 s TPOT target; 1000 prompt tokens/s per prefill worker until one is "
                          "measured"]

        # 8 lanes of distinct 300-token prompts on one prefill worker at 1 ms per token: a queue of
        # about 2.5 s on top of each prefill, for a 2 s TTFT.
        with load_in_background(f"http://127.0.0.1:{router_port}", "hello " * 300, max_tokens=4, lanes=8,
                                unique=True) as load:
            wait_for(lambda: _replicas(kube, f"{name}-prefill") >= 2, 90, "the planner to grow the prefill pool")
            wait_for(lambda: (_condition(kube, name, "SLOMet") or {}).get("status") == "False", 30,
                     "SLOMet to say the target is missed")
        assert not load.failed, load.failed[:3]
        grown = [m for m in _events(kube, "Scaled") if m.startswith("Scaled pool prefill from 1 to")]
        assert grown, _events(kube, "Scaled")
        decision = kubectl_json(kube, "get", "tsd", name)["status"]["lastScalingDecision"]
        assert decision["pool"] == "prefill" and decision["fromReplicas"] == 1 and decision["toReplicas"] >= 2
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            exposed = response.read().decode()
        assert f'triphase_planner_decisions_total{{deployment="{kube.namespace}/{name}"' in exposed
        assert "triphase_planner_desired_replicas" in exposed

        # Load gone: once the stabilization window has passed with nothing to do, back to the minimum.
        wait_for(lambda: _replicas(kube, f"{name}-prefill") == 1, 90, "the prefill pool back to its minimum")
        assert _replicas(kube, f"{name}-decode") == 1

        # Prometheus gone: nothing changes, and the condition and an Event say why.
        kube.kubectl("scale", "servingpool", f"{name}-decode", "--replicas", "2")
        server.stop()
        wait_for(lambda: (_condition(kube, name, "SLOMet") or {}).get("reason") == "MetricsUnavailable", 30,
                 "SLOMet to say the metrics are unavailable")
        assert any("Planner holds the pools" in m for m in _events(kube, "MetricsUnavailable"))
        assert _replicas(kube, f"{name}-decode") == 2  # no metrics: not scaled back down to the minimum
    kube.kubectl("delete", "tsd", name, "--wait=false")
