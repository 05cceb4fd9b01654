"""spec.slo -> rule groups: which burn-rate tiers exist for which budget, and what the rules select."""

from __future__ import annotations

import re

import pytest

from triphase.common import slo_rules
from triphase.operator.api.v1alpha1 import Slo


def _alerts(slo: Slo) -> dict[str, str]:
    return {r["labels"]["severity"]: r["expr"] for g in slo_rules.groups("llm", "ml", slo) for r in g["rules"]
            if "alert" in r}


@pytest.mark.parametrize("target,page,ticket", [
    (0.999, [0.0144, 0.006], [0.003, 0.001]),  # the SRE workbook's own example: all four tiers
    (0.99, [0.144, 0.06], [0.03, 0.01]),
    (0.9, [0.6], [0.3, 0.1]),  # 14.4 x 10 % > 1: no error ratio reaches it, so that tier is left out
    (0.5, [], [0.5]),  # a 50 % budget: only the slowest tier can fire
])
def test_burn_tiers_follow_the_budget(target: float, page: list[float], ticket: list[float]) -> None:
    alerts = _alerts(Slo(attainment_target=target))

    def thresholds(severity: str) -> list[float]:
        found = re.findall(r"> ([0-9.e-]+)", alerts.get(severity, ""))
        return sorted({float(x) for x in found}, reverse=True)

    assert thresholds("critical") == page
    assert thresholds("warning") == ticket
    assert ("critical" in alerts) == bool(page)


def test_every_rule_selects_only_its_deployment() -> None:
    for group in slo_rules.groups("llm", "ml", Slo()):
        for rule in group["rules"]:
            if rule["expr"].startswith("vector("):
                assert rule["labels"] == {"namespace": "ml", "triphase_dev_deployment": "llm"}
                continue
            selectors = re.findall(r"\{([^}]*)\}", rule["expr"])
            assert selectors, rule
            assert all('namespace="ml"' in s and 'triphase_dev_deployment="llm"' in s for s in selectors), rule


def test_targets_and_percentile_are_in_the_rules() -> None:
    rules = {r.get("record"): r["expr"] for g in slo_rules.groups("llm", "ml", Slo(ttft_seconds=1.2,
                                                                                    tpot_seconds=0.05, percentile=99))
             for r in g["rules"]}
    assert "histogram_fraction(0, 1.2," in rules["triphase:slo_ttft_misses:ratio_rate1h"]
    assert "histogram_fraction(0, 0.05," in rules["triphase:slo_tpot_misses:ratio_rate1h"]
    assert rules["triphase:slo_ttft_seconds:quantile_rate5m"].startswith("histogram_quantile(0.99,")
    assert rules["triphase:slo_ttft_target_seconds"] == "vector(1.2)"
