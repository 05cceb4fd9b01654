"""The GPU check script, run on the CPU at small sizes: every stage it will run on a GPU completes and
reports what it should, so the one call a lent GPU gets is not spent finding a bug in the script."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_stage_of_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--output", str(out), "--no-report"], capture_output=True, text=True, timeout=900)
    results = json.loads(out.read_text())
    failed = {name: r["error"] for name, r in results.items() if isinstance(r, dict) and "error" in r}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    assert results["env"]["device"] == "cpu" and results["env"]["nixl"].startswith("nixl_cu")
    assert results["exact"]["identical"], results["exact"]["rows"]
    assert set(results["decode"]["triphase"]) == set(results["decode"]["transformers"]) == {"1", "4"}
    assert results["decode"]["share_of_bound_b1"] > 0 and results["big"]["share_of_bound_b1"] > 0
    assert results["ttft"]["chunk_512"] > 0
    assert results["handoff"]["bytes_identical"] and results["handoff"]["memory"] == "DRAM"
    assert results["stack"]["identical"] and results["stack"]["nixl_bytes"] > 0
    assert results["stack"]["decode_kv_memory"] == "DRAM"
    assert results["mixed"]["identical"]  # both on the CPU here: the same memory, so NIXL moved it
    assert results["mixed"]["bytes"]["nixl"] > 0
    assert "## GPU" in proc.stdout and "identical to transformers on the device: **True**" in proc.stdout
