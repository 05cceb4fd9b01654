"""metav1-style conditions: lastTransitionTime moves only when a condition's status changes."""

from __future__ import annotations

import datetime
from typing import Any


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool | None, reason: str, message: str,
                  generation: int | None, at: str | None = None) -> list[dict[str, Any]]:
    """A new list with `type_` set; the others are kept as they are."""
    value = "Unknown" if status is None else "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type_), None)
    changed = previous is None or previous.get("status") != value
    condition = {
        "type": type_, "status": value, "reason": reason, "message": message, "observedGeneration": generation,
        "lastTransitionTime": (at or now()) if changed else previous.get("lastTransitionTime"),  # type: ignore[union-attr]
    }
    return [c for c in conditions if c.get("type") != type_] + [condition]


def get(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)
