"""The role balancer's metrics: switches, their duration, and the policy's inputs as gauges.

Labels: `deployment` (the ServingDeployment, `namespace/name`; `local/local` for `triphase up`) and
`model` on every series, so one operator's registry holds every deployment it balances.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from triphase.common.roles import Role
from triphase.control.balancer import SWITCHABLE, Decision, Switch, WorkerView

# (from, to, reason) of every switch the balancer makes: the reason follows from the role it moves to.
SWITCH_KINDS = ((str(Role.DECODE), str(Role.PREFILL), "prefill-backlog"),
                (str(Role.PREFILL), str(Role.DECODE), "decode-pressure"))


class BalancerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["deployment", "model"]
        self.switches = Counter("triphase_role_switches", "Role switches completed",
                                [*labels, "from", "to", "reason"], registry=registry)
        self.failures = Counter("triphase_role_switch_failures", "Role switches that failed", labels,
                                registry=registry)
        self.duration = Histogram("triphase_role_switch_duration_seconds", "SetRole call to the worker back in "
                                  "its new role", labels, registry=registry,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.backlog = Gauge("triphase_balancer_prefill_backlog_seconds", "Queued prompt tokens over the prefill "
                             "workers' measured rate", labels, registry=registry)
        self.prefill_pressure = Gauge("triphase_balancer_prefill_pressure", "Prefill demand over the ready "
                                      "prefill workers (1 = the pool is full)", labels, registry=registry)
        self.decode_pressure = Gauge("triphase_balancer_decode_pressure", "Decode demand over the ready decode "
                                     "workers (1 = the pool is full)", labels, registry=registry)
        self.demand = Gauge("triphase_balancer_demand_workers", "Workers' worth of capacity each role needs at "
                            "its SLO", [*labels, "role"], registry=registry)
        self.arrivals = Gauge("triphase_balancer_prompt_tokens_per_second", "Prompt tokens per second arriving "
                              "at the workers", labels, registry=registry)
        self.workers = Gauge("triphase_balancer_workers", "Ready workers by current role, as the balancer sees them",
                             [*labels, "role"], registry=registry)

    def observe(self, deployment: str, model: str, decision: Decision, workers: list[WorkerView]) -> None:
        p = decision.pressures
        if p is None:
            return
        # The counters exist at 0 from the first observation: a deployment's first switch or failure is then
        # an increase that rate() and increase() see (a series born at 1 shows none).
        for from_role, to_role, reason in SWITCH_KINDS:
            self.switches.labels(deployment, model, from_role, to_role, reason)
        self.failures.labels(deployment, model)
        self.backlog.labels(deployment, model).set(p.backlog_s)
        self.prefill_pressure.labels(deployment, model).set(p.prefill)
        self.decode_pressure.labels(deployment, model).set(p.decode)
        self.demand.labels(deployment, model, str(Role.PREFILL)).set(p.prefill_demand)
        self.demand.labels(deployment, model, str(Role.DECODE)).set(p.decode_demand)
        self.arrivals.labels(deployment, model).set(p.arrivals)
        for role in (*SWITCHABLE, Role.BOTH):
            self.workers.labels(deployment, model, str(role)).set(sum(1 for w in workers if w.role is role
                                                                      and w.healthy))

    def switched(self, deployment: str, model: str, switch: Switch, seconds: float) -> None:
        self.switches.labels(deployment, model, str(switch.from_role), str(switch.to_role), switch.reason).inc()
        self.duration.labels(deployment, model).observe(seconds)

    def forget(self, deployment: str) -> None:
        """Drop a deleted deployment's series."""
        for metric in (self.switches, self.failures, self.duration, self.backlog, self.prefill_pressure,
                       self.decode_pressure, self.demand, self.arrivals, self.workers):
            for labels in [k for k in metric._metrics if k and k[0] == deployment]:
                metric.remove(*labels)


class PlannerMetrics:
    """The planner's decisions and inputs, per deployment. Labels: `deployment` and `model` (empty until
    Prometheus has said what the workers serve)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["deployment", "model"]
        self.desired = Gauge("triphase_planner_desired_replicas", "Replicas the planner wants for each pool",
                             [*labels, "pool"], registry=registry)
        self.demand = Gauge("triphase_planner_demand_workers", "Forecast demand of each role, in workers at its SLO",
                            [*labels, "role"], registry=registry)
        self.decisions = Counter("triphase_planner_decisions", "Pool size changes the planner made",
                                 [*labels, "pool", "direction", "reason"], registry=registry)
        self.held = Counter("triphase_planner_holds", "Intervals in which the planner held back",
                            [*labels, "reason"], registry=registry)
        self.metrics_up = Gauge("triphase_planner_metrics_available", "1 when the last Prometheus read succeeded",
                                labels, registry=registry)
        self.metrics_errors = Counter("triphase_planner_metrics_errors", "Prometheus reads that failed or found "
                                      "no series", labels, registry=registry)
        self.attainment = Gauge("triphase_planner_slo_attainment_ratio", "Share of requests meeting both SLO "
                                "targets over the last window (a lower bound)", labels, registry=registry)

    def forget(self, deployment: str) -> None:
        for metric in (self.desired, self.demand, self.decisions, self.held, self.metrics_up, self.metrics_errors,
                       self.attainment):
            for labels in [k for k in metric._metrics if k and k[0] == deployment]:
                metric.remove(*labels)
