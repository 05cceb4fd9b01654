"""Generate the Grafana dashboards in deploy/grafana/ with the typed Grafana Foundation SDK (`--check`:
fail if a committed file differs). scripts/sync_chart.py copies them into the chart.

Four dashboards, each with the variables datasource, namespace, deployment and model (multi-value, "All"
= every one): "SLO overview", "Pools & control", "KV transfer", "Engine". Router and worker series are
selected by `namespace`, `triphase_dev_deployment` and `model` (the labels the operator's PodMonitor and
`triphase up --prometheus` put on them); the role balancer's and planner's series by `deployment`
(namespace/name). SLO lines and attainment come from the recording rules the operator writes per
ServingDeployment (common/src/triphase/common/slo_rules.py). A test runs every query against a real
Prometheus scraping a running `triphase up` under load and requires data from each.

    python scripts/gen_dashboards.py          # write deploy/grafana/*.json
    python scripts/gen_dashboards.py --check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "grafana"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
SERVING = 'namespace=~"$namespace", triphase_dev_deployment=~"$deployment", model=~"$model"'
RULES = 'namespace=~"$namespace", triphase_dev_deployment=~"$deployment"'
CONTROL = 'deployment=~"($namespace)/($deployment)"'
RATE = "$__rate_interval"


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class Chart:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"
    width: int = 12


def q(expr: str, legend: str) -> Query:
    return Query(" ".join(expr.split()), legend)


def quantiles(metric: str) -> tuple[Query, ...]:
    return tuple(q(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{{{SERVING}}}[{RATE}])))", f"p{pct}")
                 for p, pct in ((0.5, 50), (0.9, 90), (0.99, 99)))


SLO_OVERVIEW = [
    Chart("Time to first token", "TTFT percentiles over all the deployment's requests, and the SLO target "
          "(spec.slo.ttftSeconds).", "s",
          (*quantiles("triphase_request_ttft_seconds"),
           q(f"max(triphase:slo_ttft_target_seconds{{{RULES}}})", "SLO target"))),
    Chart("Time per output token", "TPOT percentiles (mean per request after the first token), and the SLO "
          "target (spec.slo.tpotSeconds).", "s",
          (*quantiles("triphase_request_tpot_seconds"),
           q(f"max(triphase:slo_tpot_target_seconds{{{RULES}}})", "SLO target"))),
    Chart("SLO attainment", "Share of requests meeting both targets over 5 minutes (a lower bound: TTFT and "
          "TPOT misses are added), against spec.slo.attainmentTarget.", "percentunit",
          (q(f"min(triphase:slo_attainment:ratio_rate5m{{{RULES}}})", "attainment"),
           q(f"max(triphase:slo_attainment_target{{{RULES}}})", "target"))),
    Chart("Error budget left", "Share of the 30-day error budget (1 - attainmentTarget) not yet spent; "
          "below 0: overspent.", "percentunit",
          (q(f"min(triphase:slo_error_budget_remaining:ratio{{{RULES}}})", "budget left"),), kind="stat", width=6),
    Chart("Goodput", "Requests per second that completed and met the SLO (completed rate x attainment).",
          "reqps",
          (q(f"""sum(rate(triphase_requests_total{{{SERVING}, status="ok"}}[{RATE}]))
                 * scalar(min(triphase:slo_attainment:ratio_rate5m{{{RULES}}}))""", "goodput"),),
          kind="stat", width=6),
    Chart("Requests by outcome", "Finished requests per second by status: ok, 400 (bad request), 429 "
          "(admission queue full), 499 (the client hung up mid-stream), 503 (no worker could serve), ...", "reqps",
          (q(f"sum by (status) (rate(triphase_requests_total{{{SERVING}}}[{RATE}]))", "{{status}}"),)),
    Chart("Errors by code", "Requests per second that did not end ok, by status code; clients that hung up "
          "(499) are not errors and are left out.", "reqps",
          (q(f'sum by (status) (rate(triphase_requests_total{{{SERVING}, status!~"ok|499"}}[{RATE}]))',
             "{{status}}"),)),
    Chart("Tokens", "Prompt tokens the router ran and tokens it streamed, per second.", "short",
          (q(f"sum(rate(triphase_prompt_tokens_total{{{SERVING}}}[{RATE}]))", "prompt tokens/s"),
           q(f"sum(rate(triphase_generation_tokens_total{{{SERVING}}}[{RATE}]))", "generated tokens/s"))),
]

POOLS = [
    Chart("Ready workers by role", "Workers the routers can use, by role (the highest count any router sees).",
          "short", (q(f'max by (role) (triphase_workers{{{SERVING}, state="ready"}})', "{{role}}"),)),
    Chart("Workers by state", "Workers by state, over all roles (ready, draining, unhealthy).", "short",
          (q(f"max by (state) (sum by (state, instance) (triphase_workers{{{SERVING}}}))", "{{state}}"),)),
    Chart("Current roles (role balancer)", "Ready workers by the role they serve now, as the balancer sees them.",
          "short", (q(f"max by (role) (triphase_balancer_workers{{{CONTROL}}})", "{{role}}"),)),
    Chart("Load per role (role balancer)", "Demand over ready workers: 1 = the pool is exactly full at its SLO. "
          "A worker moves to the role above 1 when the other can spare one.", "short",
          (q(f"max(triphase_balancer_prefill_pressure{{{CONTROL}}})", "prefill"),
           q(f"max(triphase_balancer_decode_pressure{{{CONTROL}}})", "decode"))),
    Chart("Desired replicas (planner)", "Replicas the planner wants per pool after its last interval.", "short",
          (q(f"max by (pool) (triphase_planner_desired_replicas{{{CONTROL}}})", "{{pool}}"),)),
    Chart("Demand (planner)", "Forecast demand per role for the next interval, in workers at the SLO.", "short",
          (q(f"max by (role) (triphase_planner_demand_workers{{{CONTROL}}})", "{{role}}"),)),
    Chart("Queued requests", "Requests waiting: in the router's admission queue and inside the workers of each "
          "role.", "short", (q(f"max by (role) (triphase_queue_depth{{{SERVING}}})", "{{role}}"),)),
    Chart("Prefill backlog", "Queued prompt tokens on the prefill workers over their measured rate (the "
          "balancer's input).", "s", (q(f"max(triphase_balancer_prefill_backlog_seconds{{{CONTROL}}})", "backlog"),)),
]

KV = [
    Chart("KV hand-off throughput", "KV bytes per second handed from prefill to decode workers, by backend.",
          "Bps", (q(f"sum by (backend) (rate(triphase_kv_transfer_bytes_total{{{SERVING}}}[{RATE}]))",
                    "{{backend}}"),)),
    Chart("KV hand-off latency", "End of prefill to the first token of the decode worker (KV pull + import), "
          "p50 and p99 by backend.", "s",
          tuple(q(f"histogram_quantile({p}, sum by (le, backend) (rate(triphase_kv_transfer_seconds_bucket"
                  f"{{{SERVING}}}[{RATE}])))", f"p{pct} {{{{backend}}}}") for p, pct in ((0.5, 50), (0.99, 99)))),
    Chart("KV received by decode workers", "KV bytes per second each decode worker pulled, by worker and backend.",
          "Bps", (q(f"sum by (worker, backend) (rate(triphase_kv_received_bytes_total{{{SERVING}}}[{RATE}]))",
                    "{{worker}} {{backend}}"),)),
    Chart("NIXL fallbacks", "NIXL transfers per second that failed and fell back to the gRPC stream.", "ops",
          (q(f"sum(rate(triphase_kv_nixl_fallbacks_total{{{SERVING}}}[{RATE}]))", "fallbacks"),)),
    Chart("Migrations and rebalanced streams", "Requests resumed on another worker (after a failure or a "
          "hand-over), and running streams a crowded decode worker handed over.", "ops",
          (q(f"sum(rate(triphase_request_migrations_total{{{SERVING}}}[{RATE}]))", "migrations"),
           q(f"sum(rate(triphase_streams_rebalanced_total{{{SERVING}}}[{RATE}]))", "rebalanced streams"))),
]

ENGINE = [
    Chart("Running requests", "Requests each worker is computing (prefill chunks or decode streams: the decode "
          "batch).", "short", (q(f"sum by (worker, role) (triphase_worker_running_requests{{{SERVING}}})",
                                 "{{worker}} ({{role}})"),)),
    Chart("Waiting requests", "Requests queued for admission in each worker (or preempted, to recompute).",
          "short", (q(f"sum by (worker, role) (triphase_worker_waiting_requests{{{SERVING}}})",
                      "{{worker}} ({{role}})"),)),
    Chart("KV cache usage", "Share of each worker's KV blocks in use.", "percentunit",
          (q(f"max by (worker, role) (triphase_kv_cache_usage_ratio{{{SERVING}}})", "{{worker}} ({{role}})"),)),
    Chart("Prefix cache hit rate", "Prompt tokens found in the prefix cache over those looked up.", "percentunit",
          (q(f"""sum(rate(triphase_prefix_cache_hits_total{{{SERVING}}}[{RATE}]))
                 / sum(rate(triphase_prefix_cache_queries_total{{{SERVING}}}[{RATE}]))""", "hit rate"),)),
    Chart("Decode step time", "Mean duration of each decode worker's last steps (the batch's TPOT).", "s",
          (q(f'max by (worker) (triphase_worker_decode_step_seconds{{{SERVING}, role=~"decode|both"}})',
             "{{worker}}"),)),
    Chart("Prefill rate", "Prompt tokens per second each prefill worker computed over its last steps.", "short",
          (q(f'max by (worker) (triphase_worker_prefill_tokens_per_second{{{SERVING}, role=~"prefill|both"}})',
             "{{worker}}"),)),
    Chart("Queued prompt tokens", "Prompt tokens waiting to be prefilled, per worker.", "short",
          (q(f"max by (worker) (triphase_worker_queued_prefill_tokens{{{SERVING}}})", "{{worker}}"),)),
    Chart("Preemptions", "Requests per second preempted when the KV cache ran out (recomputed later).", "ops",
          (q(f"sum(rate(triphase_preemptions_total{{{SERVING}}}[{RATE}]))", "preemptions"),)),
]

ANNOTATIONS = [  # on "Pools & control": what the control loops did, on the time axis (labels as tags)
    ("Role switches", "orange", f"sum by (from, to) (increase(triphase_role_switches_total{{{CONTROL}}}[1m])) > 0"),
    # The planner's decisions, seen as changes of the replicas it wants (its decisions counter is born at
    # the first decision of each reason, where increase() sees nothing).
    ("Planner decisions", "purple", f"max by (pool) (changes(triphase_planner_desired_replicas{{{CONTROL}}}[1m])) > 0"),
]

DASHBOARDS = {
    "slo-overview": ("triphase / SLO overview", "triphase-slo", "TTFT and TPOT against their targets, SLO "
                     "attainment, error budget, goodput and outcomes of one or more ServingDeployments.",
                     SLO_OVERVIEW),
    "pools-control": ("triphase / Pools & control", "triphase-pools", "Workers per role and pool over time, the "
                      "role balancer's and the planner's view and decisions.", POOLS),
    "kv-transfer": ("triphase / KV transfer", "triphase-kv", "KV hand-off from prefill to decode workers: "
                    "throughput and latency by backend, NIXL fallbacks, migrations.", KV),
    "engine": ("triphase / Engine", "triphase-engine", "Inside the workers: running and waiting requests, KV "
               "usage, prefix cache, step time, prefill rate, preemptions.", ENGINE),
}


def _variables() -> list[dash.Builder]:  # type: ignore[name-defined]
    source = dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
    out = [source]
    queries = {
        "namespace": "label_values(triphase_requests_total, namespace)",
        "deployment": 'label_values(triphase_requests_total{namespace=~"$namespace"}, triphase_dev_deployment)',
        "model": 'label_values(triphase_requests_total{namespace=~"$namespace", '
                 'triphase_dev_deployment=~"$deployment"}, model)',
    }
    for name, query in queries.items():
        out.append(dash.QueryVariable(name).label(name.capitalize()).datasource(DATASOURCE)
                   .query({"query": query, "refId": f"var-{name}"}).multi(True).include_all(True).all_value(".*")
                   .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC))
    return out


def _panel(chart: Chart):  # type: ignore[no-untyped-def]
    panel = (stat.Panel() if chart.kind == "stat" else timeseries.Panel().fill_opacity(10).line_width(1))
    panel = panel.title(chart.title).description(chart.description).unit(chart.unit).datasource(DATASOURCE)
    panel = panel.height(4 if chart.kind == "stat" else 8).span(chart.width)
    for i, query in enumerate(chart.queries):
        panel = panel.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend)
                                  .ref_id(chr(ord("A") + i)).datasource(DATASOURCE))
    return panel


def build(key: str) -> dict[str, object]:
    title, uid, description, charts = DASHBOARDS[key]
    board = (dash.Dashboard(title).uid(uid).description(description).tags(["triphase", "llm-serving"])
             .refresh("30s").time("now-1h", "now").timezone("browser").tooltip(model.DashboardCursorSync.CROSSHAIR)
             .variables(_variables()))
    if key == "pools-control":
        for name, color, expr in ANNOTATIONS:
            board = board.annotation(dash.AnnotationQuery().name(name).datasource(DATASOURCE).enable(True)
                                     .icon_color(color).expr(expr))
    for chart in charts:
        board = board.with_panel(_panel(chart))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def rendered() -> dict[str, str]:
    return {f"{key}.json": json.dumps(build(key), indent=2, sort_keys=True) + "\n" for key in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a committed dashboard differs")
    args = parser.parse_args(argv)
    files = rendered()
    if args.check:
        stale = sorted(n for n, text in files.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text)
        extra = sorted(p.name for p in OUT.glob("*.json") if p.name not in files)
        if stale or extra:
            sys.stderr.write(f"deploy/grafana is out of date ({', '.join(stale + extra)}): "
                             "run python scripts/gen_dashboards.py\n")
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
