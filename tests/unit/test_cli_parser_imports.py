"""`triphase`'s parser holds every subcommand's arguments; building it must not import what only one
subcommand runs on. torch imported by the parser made the operator, the router and the control loop
each start with the engine's ~700 MiB of memory they never use."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "nixl", "kopf", "fastapi", "matplotlib")


def test_building_the_parser_imports_no_component_runtime():
    probe = ("import sys; from triphase.cli import build_parser; build_parser(); "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert found.stdout.split() == []
