"""Operator-wide settings from `triphase operator`'s flags, set once before the handlers register
(handlers.py reads RESYNC_SECONDS when its timer is declared)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Settings:
    resync_seconds: float = 30.0  # --resync-seconds: period of the level-based resync
    monitoring_labels: dict[str, str] = dataclasses.field(default_factory=dict)  # --monitoring-label KEY=VALUE
    router_cluster_role: str = "triphase-router"  # --router-cluster-role


SETTINGS = Settings()


def monitoring_labels() -> dict[str, str]:
    return dict(SETTINGS.monitoring_labels)
