"""`triphase profile` and `triphase plan` as a user runs them: profiling the sim engine recovers the
timing it was given, a sim worker replays a profile, and the plan of a profile names the best split."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from triphase.common.profile import Profile

pytestmark = pytest.mark.slow
SIM = ["--engine", "sim", "--sim-prefill-ms", "5", "--sim-prefill-per-token-ms", "1", "--sim-decode-ms", "40",
       "--sim-decode-per-seq-ms", "20"]
SMALL = ["--prompt-lengths", "64,512", "--batch-sizes", "1,4", "--contexts", "64,128", "--decode-steps", "4",
         "--repeats", "1"]


def triphase(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "triphase.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_profiling_the_sim_engine_recovers_its_timing_and_a_replay_matches(tmp_path: pathlib.Path) -> None:
    measured = tmp_path / "sim.json"
    proc = triphase("profile", *SIM, *SMALL, "-o", str(measured))
    assert proc.returncode == 0, proc.stderr
    assert "prefill    512 tokens" in proc.stderr  # progress, one line per measurement
    profile = Profile.load(measured)
    assert profile.prefill_per_token_s == pytest.approx(0.001, rel=0.1)
    assert profile.decode_per_seq_s == pytest.approx(0.020, rel=0.1)
    assert profile.decode_base_s == pytest.approx(0.040, abs=0.01)  # plus the engine's own few ms per step
    replayed = tmp_path / "replayed.json"
    proc = triphase("profile", "--engine", "sim", "--sim-profile", str(measured), *SMALL, "-o", str(replayed))
    assert proc.returncode == 0, proc.stderr
    again = Profile.load(replayed)
    assert again.prefill_per_token_s == pytest.approx(profile.prefill_per_token_s, rel=0.1)
    assert again.decode_per_seq_s == pytest.approx(profile.decode_per_seq_s, rel=0.1)


def test_a_batch_whose_prompts_take_many_prefill_steps_is_timed_decoding(tmp_path: pathlib.Path) -> None:
    # 8 prompts of 512 tokens take 8 prefill steps of 512 tokens; the first ones decode meanwhile and
    # once finished before the last one started, so the timed steps ran nothing (0 ms per step).
    measured = tmp_path / "wide.json"
    proc = triphase("profile", *SIM, "--prompt-lengths", "64,512", "--batch-sizes", "1,2,8", "--contexts", "512",
                    "--decode-steps", "4", "--repeats", "1", "-o", str(measured))
    assert proc.returncode == 0, proc.stderr
    steps = {int(b): s for b, _, s in Profile.load(measured).decode_points}
    assert steps[8] == pytest.approx(0.040 + 8 * 0.020, rel=0.15)  # the sim's 40 ms + 20 ms per sequence
    assert steps[8] > steps[2] > steps[1]


def test_plan_reports_every_split_and_the_best_with_a_plot(tmp_path: pathlib.Path) -> None:
    profile = tmp_path / "p.json"
    Profile(0.005, 0.001, 0.04, 0.02).save(profile)
    png = tmp_path / "plan.png"
    proc = triphase("plan", "--profile", str(profile), "--workers", "3", "--rates", "0.25,1,4", "--duration", "60",
                    "--ttft", "4", "--tpot", "0.2", "--prompt", "500:1500", "--output", "20:60", "--json",
                    "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(s["prefill"], s["decode"]) for s in report["splits"]] == [(1, 2), (2, 1)]
    assert all(s["attainment"][0] >= s["attainment"][-1] for s in report["splits"])  # more load, no better
    best = max(report["splits"], key=lambda s: s["goodput_per_worker"])
    assert (report["best"]["prefill"], report["best"]["decode"]) == (best["prefill"], best["decode"])
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, words", [
    (["plan", "--profile", "missing.json"], "No such file"),
    (["plan", "--profile", "PROFILE", "--splits", "2"], "expected PREFILL:DECODE"),
    (["plan", "--profile", "PROFILE", "--rates", "1e9"], "at most 200000 requests"),
    (["profile", "--engine", "sim", "--batch-sizes", "0"], "each value must be in 1.."),
    (["profile", "--sim-profile", "x.json"], "--sim-profile needs --engine sim"),
])
def test_bad_arguments_are_one_line_errors(tmp_path: pathlib.Path, args: list[str], words: str) -> None:
    profile = tmp_path / "p.json"
    Profile(0.005, 0.001, 0.04, 0.02).save(profile)
    proc = triphase(*[str(profile) if a == "PROFILE" else a for a in args], "-o" if args[0] == "profile" else "--seed",
                    str(tmp_path / "out.json") if args[0] == "profile" else "0")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr


def test_profiling_a_mixture_of_experts_model_records_its_experts(tmp_path: pathlib.Path) -> None:
    """`triphase profile` on a Qwen3-MoE checkpoint: the profile carries its experts and top-k, so the
    planner and the sim engine predict its step times with the experts a batch touches."""
    from tests.checkpoints import build_checkpoint

    build_checkpoint("qwen3_moe", tmp_path / "moe")
    measured = tmp_path / "moe.json"
    proc = triphase("profile", "--model", str(tmp_path / "moe"), "--dtype", "float32", "--prompt-lengths", "16,64",
                    "--batch-sizes", "1,2,8", "--contexts", "16,32", "--decode-steps", "2", "--repeats", "1",
                    "-o", str(measured))
    assert proc.returncode == 0, proc.stderr
    profile = Profile.load(measured)
    assert (profile.experts, profile.top_k) == (8, 3)
    assert profile.decode_step_s(8, 256) > profile.decode_step_s(1, 32) > 0
    replayed = tmp_path / "replayed.json"
    proc = triphase("profile", "--engine", "sim", "--sim-profile", str(measured), *SMALL, "-o", str(replayed))
    assert proc.returncode == 0, proc.stderr
