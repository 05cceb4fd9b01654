"""The operator's Prometheus registry (served by `triphase operator --metrics-port`): the role
balancer's series for every ServingDeployment it balances."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from triphase.control.metrics import BalancerMetrics

REGISTRY = CollectorRegistry()
BALANCER = BalancerMetrics(REGISTRY)
