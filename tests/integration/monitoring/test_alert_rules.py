"""The alerting rules on the real promtool (built from the Go module proxy, as the planner's tests do):
the static alerts of deploy/prometheus with their unit tests, and the SLO rules the operator writes per
ServingDeployment, evaluated over synthetic router histograms (a burning and a healthy deployment)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import yaml

from triphase.common import slo_rules
from triphase.local import prometheus
from triphase.operator.api.v1alpha1 import Slo

ROOT = pathlib.Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus"


def _promtool(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prometheus.ensure(progress=False).promtool, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def _documented() -> set[str]:
    return set(re.findall(r"^\| `(triphase_[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M))


def _metric_names(expr: str) -> set[str]:
    """Raw metric names an expression reads (recorded `a:b:c` names and histogram suffixes aside)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set(re.findall(r"(?<![:\w])(triphase_[a-z0-9_]+)(?![:\w])", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_static_alerts_pass_promtool_check_and_their_unit_tests() -> None:
    checked = _promtool("check", "rules", "alerts.yaml", cwd=RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "alerts.test.yaml", cwd=RULES)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_a_runbook_and_the_annotations() -> None:
    groups = yaml.safe_load((RULES / "alerts.yaml").read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load((RULES / "alerts.test.yaml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    runbooks = (ROOT / "docs" / "runbooks.md").read_text().lower()
    for alert in alerts:
        name = alert["alert"]
        assert name in tested, f"{name}: no promtool case where it fires"
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"]), name
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert f"## {anchor}" in runbooks, f"{name}: docs/runbooks.md has no section #{anchor}"
    assert "## triphaseerrorbudgetburn" in runbooks


def test_rules_read_only_documented_metrics() -> None:
    documented = _documented()
    exprs = [r["expr"] for g in yaml.safe_load((RULES / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
    exprs += [r["expr"] for g in slo_rules.groups("llm", "ml", Slo()) for r in g["rules"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used and used <= documented, used - documented


def _histogram(metric: str, labels: str, buckets: dict[str, int], minutes: int) -> list[dict[str, str]]:
    """Series of a classic histogram growing by `buckets[le]` (cumulative) per minute."""
    return [{"series": f'{metric}_bucket{{{labels}, le="{le}"}}', "values": f"0+{n}x{minutes}"}
            for le, n in buckets.items()]


def test_slo_rules_record_attainment_and_page_on_a_burning_budget(tmp_path: pathlib.Path) -> None:
    # Both deployments: TTFT target 2 s (a bucket boundary), TPOT 0.1 s, 90 % of requests (budget 10 %).
    slo = Slo(ttft_seconds=2.0, tpot_seconds=0.1, attainment_target=0.9)
    rule_files = []
    for name in ("burning", "healthy", "short"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"groups": slo_rules.groups(name, "ml", slo)}))
        rule_files.append(path.name)
    checked = _promtool("check", "rules", *rule_files, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    def labels(name: str) -> str:
        return f'namespace="ml", triphase_dev_deployment="{name}", model="m", instance="router-0"'

    minutes = 40
    series = [
        # burning: every request's first token after 3 s (TTFT misses all), TPOT fine.
        *_histogram("triphase_request_ttft_seconds", labels("burning"), {"1": 0, "2": 0, "3": 10, "+Inf": 10},
                    minutes),
        *_histogram("triphase_request_tpot_seconds", labels("burning"), {"0.05": 10, "0.1": 10, "+Inf": 10},
                    minutes),
        # healthy: 1 in 20 misses TTFT, none TPOT: 5 % of a 10 % budget.
        *_histogram("triphase_request_ttft_seconds", labels("healthy"), {"1": 15, "2": 19, "3": 20, "+Inf": 20},
                    minutes),
        *_histogram("triphase_request_tpot_seconds", labels("healthy"), {"0.05": 20, "0.1": 20, "+Inf": 20},
                    minutes),
        # short: one-token replies (no TPOT at all), TTFT all fine.
        *_histogram("triphase_request_ttft_seconds", labels("short"), {"1": 5, "2": 5, "3": 5, "+Inf": 5}, minutes),
        *_histogram("triphase_request_tpot_seconds", labels("short"), {"0.05": 0, "0.1": 0, "+Inf": 0}, minutes),
    ]
    page = {"severity": "critical", "namespace": "ml", "triphase_dev_deployment": "burning", "model": "m"}
    ticket = {**page, "severity": "warning"}
    rule_test = {
        "rule_files": rule_files, "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m", "input_series": series,
            "promql_expr_test": [  # rounded: promtool compares floats exactly
                _expect("triphase:slo_attainment:ratio_rate5m", "healthy", "20m", 0.95),
                _expect("triphase:slo_error_budget_remaining:ratio", "healthy", "20m", 0.5),
                _expect("triphase:slo_errors:ratio_rate5m", "short", "20m", 0),
                _expect("triphase:slo_ttft_target_seconds", "burning", "5m", 2, model=False),
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "TriphaseErrorBudgetBurn", "exp_alerts": []},  # pending
                {"eval_time": "10m", "alertname": "TriphaseErrorBudgetBurn",
                 "exp_alerts": [{"exp_labels": page, "exp_annotations": _annotations("burning", "critical")}]},
                {"eval_time": "30m", "alertname": "TriphaseErrorBudgetBurn",
                 "exp_alerts": [{"exp_labels": page, "exp_annotations": _annotations("burning", "critical")},
                                {"exp_labels": ticket, "exp_annotations": _annotations("burning", "warning")}]},
            ],
        }],
    }
    (tmp_path / "slo.test.yaml").write_text(yaml.safe_dump(rule_test))
    tested = _promtool("test", "rules", "slo.test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _expect(record: str, deployment: str, at: str, value: float, model: bool = True) -> dict[str, object]:
    """A promtool expression test: the recorded series of ml/<deployment>, rounded, equals `value`."""
    labels = {"namespace": "ml", "triphase_dev_deployment": deployment, **({"model": "m"} if model else {})}
    shown = "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return {"expr": f'round({record}{{triphase_dev_deployment="{deployment}"}}, 0.0001)', "eval_time": at,
            "exp_samples": [{"labels": shown, "value": value}]}


def _annotations(name: str, severity: str) -> dict[str, str]:
    """The rendered annotations of the burn alert of ml/<name> (100 % of its requests missing the SLO)."""
    alert = next(r for g in slo_rules.groups(name, "ml", Slo(ttft_seconds=2.0, tpot_seconds=0.1,
                                                                 attainment_target=0.9))
                 for r in g["rules"] if r.get("alert") and r["labels"]["severity"] == severity)
    rendered = dict(alert["annotations"])
    rendered["summary"] = rendered["summary"].replace("{{ $value | humanizePercentage }}", "100%")
    return rendered


def test_docs_name_every_alert_and_dashboard() -> None:
    """A user finds each alert and dashboard in docs/observability.md (NOTES.txt points there)."""
    doc = (ROOT / "docs" / "observability.md").read_text()
    alerts = [r["alert"] for g in yaml.safe_load((RULES / "alerts.yaml").read_text())["groups"] for r in g["rules"]
              if "alert" in r]
    assert all(name in doc for name in [*alerts, "TriphaseErrorBudgetBurn"])
    for path in (ROOT / "deploy" / "grafana").glob("*.json"):
        board = json.loads(path.read_text())
        assert path.name in doc and board["uid"] in doc and board["title"] in doc, path.name
    assert "docs/observability.md" in (ROOT / "helm" / "triphase" / "templates" / "NOTES.txt").read_text()
