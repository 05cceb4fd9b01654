"""Generated code is committed and must match its sources byte for byte."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_proto_gen_is_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_crds_are_fresh():
    from triphase.operator.api import crd

    assert crd.main(["--check"]) == 0


def test_chart_copies_of_deploy_are_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_chart.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_dashboards_are_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_dashboards.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
