"""Logging set-up, called once from each `__main__`."""

from __future__ import annotations

import logging
import os


def configure(level: str | None = None) -> None:
    """Configure the root logger: one line per record, level from TRIPHASE_LOG_LEVEL or `level`."""
    chosen = (level or os.environ.get("TRIPHASE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=chosen,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
