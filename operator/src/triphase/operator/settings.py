"""Operator-wide settings from `triphase operator`'s flags, set once before the handlers register
(handlers.py reads RESYNC_SECONDS when its timer is declared)."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class Settings:
    resync_seconds: float = 30.0  # --resync-seconds: period of the level-based resync
    monitoring_labels: dict[str, str] = dataclasses.field(default_factory=dict)  # --monitoring-label KEY=VALUE
    router_cluster_role: str = "triphase-router"  # --router-cluster-role
    # where the operator runs (the chart passes its pod's namespace): the workers' NetworkPolicy admits it
    operator_namespace: str = dataclasses.field(
        default_factory=lambda: os.environ.get("POD_NAMESPACE", "triphase-system"))


SETTINGS = Settings()


def monitoring_labels() -> dict[str, str]:
    return dict(SETTINGS.monitoring_labels)
