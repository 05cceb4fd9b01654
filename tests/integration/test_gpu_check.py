"""The GPU check script, run on the CPU at small sizes the way scripts/gpu_payload.sh runs it on a lent
GPU (random SmolLM2-shaped weights and the exported tokenizer, the stages split over two runs, the
section rendered from both files): every stage completes and reports what it should, so the one call
a lent GPU gets is not spent finding a bug in the script."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def gpu_check(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def test_every_stage_of_the_gpu_check_runs_on_the_cpu(tmp_path):
    assert gpu_check("--export-tokenizer", tmp_path / "tokenizer").returncode == 0
    common = ["--device", "cpu", "--quick", "--random-model", tmp_path / "tokenizer", "--no-report"]
    first = gpu_check(*common, "--only", "env,exact,decode,big,ttft", "--output", tmp_path / "1.json")
    second = gpu_check(*common, "--only", "env,handoff,stack,mixed", "--output", tmp_path / "2.json")
    results = json.loads((tmp_path / "1.json").read_text()) | json.loads((tmp_path / "2.json").read_text())
    failed = {name: r["error"] for name, r in results.items() if isinstance(r, dict) and "error" in r}
    assert first.returncode == second.returncode == 0 and not failed, (failed, first.stderr[-2000:],
                                                                      second.stderr[-2000:])
    assert "random weights" in results["model"]
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
    assert "identical to transformers on the device: **True**" in first.stdout
