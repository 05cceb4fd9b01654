"""The operator's Prometheus registry (served by `triphase operator --metrics-port`): the role
balancer's and the planner's series for every ServingDeployment they run for."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from triphase.control.metrics import BalancerMetrics, PlannerMetrics

REGISTRY = CollectorRegistry()
BALANCER = BalancerMetrics(REGISTRY)
PLANNER = PlannerMetrics(REGISTRY)
