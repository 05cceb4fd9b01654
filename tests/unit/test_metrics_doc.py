"""docs/metrics.md lists every metric the router, the balancer, the planner and the workers export, and
nothing they do not (one source of names: a dashboard or rule built from the doc finds its series)."""

from __future__ import annotations

import pathlib
import re

from prometheus_client import CollectorRegistry

from triphase.control.metrics import BalancerMetrics, PlannerMetrics
from triphase.router.metrics import RouterMetrics

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _exported(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_the_metrics_doc_matches_what_is_exported() -> None:
    documented = set(re.findall(r"^\| `(triphase_[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    control = CollectorRegistry()
    BalancerMetrics(control)
    PlannerMetrics(control)
    exported = _exported(RouterMetrics("m").registry) | _exported(control)
    # The worker's collector builds its families at scrape time from the engine's stats: its names are
    # the literals in workers/metrics.py (gauges as written, counters with the _total prometheus adds).
    source = (ROOT / "workers" / "src" / "triphase" / "workers" / "metrics.py").read_text()
    exported |= set(re.findall(r'(?:gauge|GaugeMetricFamily)\("(triphase_[a-z0-9_]+)"', source))
    exported |= {f"{n}_total" for n in re.findall(r'counter\("(triphase_[a-z0-9_]+)"', source)}
    exported |= {f"{n}_total" for n in re.findall(r'CounterMetricFamily\("(triphase_[a-z0-9_]+)"', source)}
    assert documented - exported == set(), "documented but not exported"
    assert exported - documented == set(), "exported but not documented"
