"""A deployment's SLO -> Prometheus rule groups of its own: SLO attainment recorded, the error budget's
burn alerted. Pure. The operator wraps them in a PrometheusRule owned by the ServingDeployment
(builders.slo_rule; the rules follow its life and its edits); `triphase up --prometheus` writes them
into its Prometheus's rule file for the local deployment. `slo`: anything with the four targets
(the CRD's `spec.slo`).

What is measured (from the router's histograms, labels `namespace`, `triphase_dev_deployment`, `model`):
  TTFT misses over a window w = 1 - histogram_fraction(0, slo.ttftSeconds, rate(ttft buckets[w]))
  TPOT misses                 = the same with slo.tpotSeconds
  errors                      = min(1, TTFT misses + TPOT misses)
A request is good when it meets both targets; the histograms are separate, so `errors` is an upper bound
(the planner's attainment is the same bound). Between two buckets histogram_fraction interpolates; a
target on a bucket boundary (docs/metrics.md lists them) is counted exactly.

The error budget is 1 - slo.attainmentTarget of the requests over BUDGET_PERIOD. Alerts follow the
multiwindow, multi-burn-rate scheme of the Google SRE workbook ("Alerting on SLOs"): a page when 2 % of
the budget went in an hour or 5 % in six hours, a ticket when 10 % went in three days or a day, each
checked over a long window and a short one (the short one ends the alert soon after a recovery). A tier
whose threshold (burn rate x budget) is 1 or more cannot fire — no error ratio exceeds 1: the budget is
too large to be spent that fast — and is left out.

Recorded series (for dashboards and the alerts; every one labelled with namespace and deployment):
  triphase:slo_{ttft,tpot}_misses:ratio_rate<w>, triphase:slo_errors:ratio_rate<w>   w in WINDOWS
  triphase:slo_attainment:ratio_rate5m                 1 - errors over 5 minutes
  triphase:slo_error_budget_remaining:ratio            1 - errors over BUDGET_PERIOD / budget (< 0: overspent)
  triphase:slo_{ttft,tpot}_seconds:quantile_rate5m     TTFT/TPOT at slo.percentile over 5 minutes
  triphase:slo_{ttft,tpot}_target_seconds, triphase:slo_attainment_target, triphase:slo_percentile
                                                       the targets, as lines a dashboard draws
"""

from __future__ import annotations

from typing import Any, Protocol

from triphase.common import labels


class Slo(Protocol):
    """The targets (operator/api/v1alpha1.py `Slo` documents each)."""

    @property
    def ttft_seconds(self) -> float: ...
    @property
    def tpot_seconds(self) -> float: ...
    @property
    def percentile(self) -> float: ...
    @property
    def attainment_target(self) -> float: ...

BUDGET_PERIOD = "30d"
# (severity, burn rate, long window, short window): the SRE workbook's four tiers for a 30-day budget.
TIERS = (("critical", 14.4, "1h", "5m"), ("critical", 6.0, "6h", "30m"),
         ("warning", 3.0, "1d", "2h"), ("warning", 1.0, "3d", "6h"))
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d", BUDGET_PERIOD)
FOR = {"critical": "2m", "warning": "15m"}
RUNBOOK = "https://github.com/triphase/triphase/blob/main/docs/runbooks.md#triphaseerrorbudgetburn"
TTFT = "triphase_request_ttft_seconds"
TPOT = "triphase_request_tpot_seconds"
DEPLOYMENT_LABEL = labels.PROMETHEUS_DEPLOYMENT
BY = f"namespace, {DEPLOYMENT_LABEL}, model"


def _selector(name: str, namespace: str) -> str:
    return f'namespace="{namespace}", {DEPLOYMENT_LABEL}="{name}"'


def _fraction(metric: str, target: float, sel: str, window: str) -> str:
    return f"histogram_fraction(0, {target:g}, sum by ({BY}, le) (rate({metric}_bucket{{{sel}}}[{window}])))"


def _recording(name: str, namespace: str, slo: Slo) -> list[dict[str, Any]]:
    sel = _selector(name, namespace)
    mine = {"namespace": namespace, DEPLOYMENT_LABEL: name}
    rules: list[dict[str, Any]] = []
    for w in WINDOWS:
        ttft, tpot = (f"triphase:slo_{kind}:ratio_rate{w}" for kind in ("ttft_misses", "tpot_misses"))
        mine_ttft, mine_tpot = f"{ttft}{{{sel}}}", f"{tpot}{{{sel}}}"
        rules += [
            {"record": ttft, "expr": f"1 - {_fraction(TTFT, slo.ttft_seconds, sel, w)}"},
            {"record": tpot, "expr": f"1 - {_fraction(TPOT, slo.tpot_seconds, sel, w)}"},
            # A window whose requests all had one token has no TPOT (NaN): it counts as no TPOT miss.
            {"record": f"triphase:slo_errors:ratio_rate{w}",
             "expr": f"clamp_max({mine_ttft} + ({mine_tpot} >= 0 or {mine_ttft} * 0), 1)"},
        ]
    budget = 1 - slo.attainment_target
    q = slo.percentile / 100
    rules += [
        {"record": "triphase:slo_attainment:ratio_rate5m", "expr": f"1 - triphase:slo_errors:ratio_rate5m{{{sel}}}"},
        {"record": "triphase:slo_error_budget_remaining:ratio",
         "expr": f"1 - triphase:slo_errors:ratio_rate{BUDGET_PERIOD}{{{sel}}} / {budget:g}"},
        {"record": "triphase:slo_ttft_seconds:quantile_rate5m",
         "expr": f"histogram_quantile({q:g}, sum by ({BY}, le) (rate({TTFT}_bucket{{{sel}}}[5m])))"},
        {"record": "triphase:slo_tpot_seconds:quantile_rate5m",
         "expr": f"histogram_quantile({q:g}, sum by ({BY}, le) (rate({TPOT}_bucket{{{sel}}}[5m])))"},
    ]
    for record, value in (("triphase:slo_ttft_target_seconds", slo.ttft_seconds),
                          ("triphase:slo_tpot_target_seconds", slo.tpot_seconds),
                          ("triphase:slo_attainment_target", slo.attainment_target),
                          ("triphase:slo_percentile", slo.percentile)):
        rules.append({"record": record, "expr": f"vector({value:g})", "labels": dict(mine)})
    return rules


def _alerts(name: str, namespace: str, slo: Slo) -> list[dict[str, Any]]:
    sel = _selector(name, namespace)
    budget = 1 - slo.attainment_target
    alerts = []
    for severity in ("critical", "warning"):
        tiers = [(rate, long, short) for s, rate, long, short in TIERS if s == severity and rate * budget < 1]
        if not tiers:
            continue
        expr = "\nor\n".join(f"(triphase:slo_errors:ratio_rate{long}{{{sel}}} > {rate * budget:g}\n"
                             f" and triphase:slo_errors:ratio_rate{short}{{{sel}}} > {rate * budget:g})"
                             for rate, long, short in tiers)
        windows = " or ".join(f"{rate:g}x the sustainable rate over {long}" for rate, long, _ in tiers)
        alerts.append({
            "alert": "TriphaseErrorBudgetBurn", "expr": expr, "for": FOR[severity],
            "labels": {"severity": severity},
            "annotations": {
                "summary": f"{namespace}/{name} spends its error budget fast ({{{{ $value | humanizePercentage }}}} "
                           "of requests miss the SLO)",
                "description": f"Requests miss TTFT <= {slo.ttft_seconds:g} s or TPOT <= {slo.tpot_seconds:g} s at "
                               f"{windows}: at that pace the {budget:.4g} error budget (attainment target "
                               f"{slo.attainment_target:g}) of {BUDGET_PERIOD} runs out early.",
                "runbook_url": RUNBOOK,
            },
        })
    return alerts


def groups(name: str, namespace: str, slo: Slo) -> list[dict[str, Any]]:
    """The rule groups of the PrometheusRule `<name>-slo` (builders.slo_rule wraps them)."""
    return [{"name": f"triphase.slo.{namespace}.{name}.recording", "rules": _recording(name, namespace, slo)},
            {"name": f"triphase.slo.{namespace}.{name}.alerts", "rules": _alerts(name, namespace, slo)}]
