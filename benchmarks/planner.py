"""The planner under a shifting load (issue 11's benchmark): static split vs role switching vs role
switching + planner, in one run, on the role-switching benchmark's load (benchmarks/roles.py: sim
workers, open-loop Poisson arrivals shifting prompt-heavy -> decode-heavy -> prompt-heavy, the same
seed, SLO and timing).

Configurations, each under `triphase up --engine sim`:
- static: 4 prefill + 4 decode (per 8 workers of scale);
- switching: the same workers with `--role-switching`;
- switching + planner: the same start with `--autoscale` too (it may start and stop workers);
- best static in hindsight: the smallest static split that `triphase plan`'s model, run on this very
  load with a profile measured at the start (`triphase profile --engine sim`), predicts to reach 95 %
  attainment, then measured like the others.
Reported per configuration: SLO attainment, goodput, reaction per shift, reversals, worker-seconds
(worker processes alive, starting and draining included, integrated over the load); and the plan's
predicted attainment of each static split beside the measured one. Writes the "planner" section of
BENCHMARKS.md and benchmarks/planner.png.

    python benchmarks/planner.py                 # 8 sim workers of scale, 60 s phases
    python benchmarks/planner.py --phase 30 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import pathlib
import sys
import tempfile
import threading
import time
import urllib.request

import psutil
import roles
import stack
from report import ROOT, figure, log, save_figure, update_section

sys.path.insert(0, str(ROOT))
from triphase.common.profile import Profile
from triphase.control.simulate import Request, simulate
from triphase.local.processes import triphase_up

PLANNER = ["--autoscale", "--planner-interval", "5", "--stabilization", "60", "--slo-percentile", "90",
           "--min-prefill", "1", "--min-decode", "1"]
PROMPT_OVERHEAD = 8  # tokens of "request <arrival> " before the words (each " hello" is one token)


@dataclasses.dataclass
class Run:
    name: str
    prefill: int
    decode: int
    results: list[roles.Result]
    samples: list[tuple[float, int, int]]  # (t, worker processes, ready prefill workers)
    decisions: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # the planner's, timed

    def worker_seconds(self, end: float) -> float:
        inside = [s for s in self.samples if s[0] <= end]
        return sum((b[0] - a[0]) * a[1] for a, b in itertools.pairwise(inside)) + \
            (end - inside[-1][0]) * inside[-1][1] if inside else 0.0


class Sampler(threading.Thread):
    """Every 0.5 s: worker processes under `triphase up` and the router's ready prefill workers."""

    def __init__(self, url: str, up_pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pid = url, up_pid
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(0.5):  # the sampling period
            try:
                processes = sum(1 for c in psutil.Process(self.pid).children()
                                if "worker" in c.cmdline()[3:5])  # python -m triphase.cli worker ...
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                    prefill = sum(1 for w in json.load(response)["workers"] if w["role"] == "prefill")
            except (OSError, psutil.Error):
                continue
            self.samples.append((time.monotonic() - self.t0, processes, prefill))


def run_config(name: str, prefill: int, decode: int, extra: list[str], plan, seed: int,  # type: ignore[no-untyped-def]
               max_each: int) -> Run:
    args = ["--engine", "sim", "--prefill", str(prefill), "--decode", str(decode), *roles.TIMING, *extra]
    if "--autoscale" in extra:
        args += ["--max-prefill", str(max_each), "--max-decode", str(max_each)]
    log(f"{name}: {prefill} prefill + {decode} decode")
    with triphase_up(args) as (proc, url):
        sampler = Sampler(url, proc.pid)
        sampler.start()
        results = asyncio.run(roles.drive(url, plan, seed))
        sampler.done.set()
        sampler.join()
        decisions = [(t - sampler.t0, line.split("planner: ", 1)[1].strip()) for t, line in proc.said
                     if "planner: " in line and t >= sampler.t0]
    for t, decision in decisions:
        log(f"{name} {t:6.1f} s: {decision}")
    return Run(name, prefill, decode, results, sampler.samples, decisions)


def measure_profile(tmp: pathlib.Path) -> Profile:
    return stack.profile(tmp / "sim-profile.json", [
        "--engine", "sim", *roles.TIMING, "--prompt-lengths", "64,512,1024", "--batch-sizes", "1,4,8,12",
        "--contexts", "64,256", "--decode-steps", "6", "--repeats", "2"])


def trace(plan, seed: int) -> list[Request]:  # type: ignore[no-untyped-def]
    return [Request(t, words + PROMPT_OVERHEAD, tokens) for t, words, tokens in roles.arrivals(plan, seed)]


def predicted(profile: Profile, requests: list[Request], prefill: int, decode: int) -> float:
    return simulate(profile, prefill, decode, requests).attainment(roles.TTFT_S, roles.TPOT_S)


def best_static(profile: Profile, requests: list[Request], largest: int) -> tuple[int, int, float]:
    """The smallest static split predicted to reach 95 % (the best-attaining of that size)."""
    for total in range(2, largest + 1):
        options = [(predicted(profile, requests, p, total - p), p) for p in range(1, total)]
        attainment, p = max(options)
        if attainment >= 0.95:
            return p, total - p, attainment
    raise SystemExit(f"no static split of up to {largest} workers reaches 95 % in the model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", type=float, default=60.0, help="seconds per load phase")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md and the PNG alone")
    args = parser.parse_args()
    plan = roles.phases(args.phase, 1.0)
    end = plan[-1][1]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="planner-bench-"))
    profile = measure_profile(tmp)
    log(f"profile: prefill {profile.prefill_base_s * 1e3:.1f} ms + {profile.prefill_per_token_s * 1e3:.3f} "
        f"ms/token, decode {profile.decode_base_s * 1e3:.1f} ms + {profile.decode_per_seq_s * 1e3:.2f} ms/stream")
    requests = trace(plan, args.seed)
    hp, hd, hindsight_predicted = best_static(profile, requests, 16)
    log(f"best static split in hindsight (model): {hp} prefill + {hd} decode, predicted {hindsight_predicted:.1%}")

    runs = [
        run_config("static", 4, 4, [], plan, args.seed, 0),
        run_config("switching", 4, 4, roles.SWITCHING, plan, args.seed, 0),
        run_config("switching + planner", 4, 4, [*roles.SWITCHING, *PLANNER], plan, args.seed, 8),
        run_config(f"best static in hindsight ({hp}+{hd})", hp, hd, [], plan, args.seed, 0),
    ]
    static_runs = {(4, 4): runs[0], (hp, hd): runs[3]}

    rows, curves = [], {}
    for run in runs:
        met = sum(r.met for r in run.results)
        attainment = met / len(run.results)
        curves[run.name] = roles.rolling(run.results, end)
        reactions = [roles.reaction(curves[run.name], start, stop) for start, stop, _ in plan[1:]]
        shown = ", ".join("never" if r is None else f"{r:.0f} s" for r in reactions)
        count = [(t, n if "planner" in run.name else p, 0.0, 0.0) for t, n, p in run.samples]
        by_phase = " / ".join(
            f"{sum(r.met for r in inside) / max(len(inside), 1):.0%}"
            for inside in ([r for r in run.results if a <= r.arrival < b] for a, b, _ in plan))
        rows.append((run, attainment, met / end, by_phase, shown, reactions, roles.reversals(count),
                     run.worker_seconds(end), sum(not r.ok for r in run.results)))
        log(f"{run.name}: attainment {attainment:.1%} ({by_phase}), reactions {shown}, "
            f"worker-seconds {run.worker_seconds(end):.0f}")
    validation = []
    for (p, d), run in static_runs.items():
        measured = sum(r.met for r in run.results) / len(run.results)
        validation.append((p, d, predicted(profile, requests, p, d), measured))

    planner_row = rows[2]
    hindsight_ws = rows[3][7]
    ws_ratio = planner_row[7] / hindsight_ws
    errors = [abs(pred - meas) * 100 for _, _, pred, meas in validation]
    lines = [
        f"`python benchmarks/planner.py --phase {args.phase:g}` — one run ({time.strftime('%Y-%m-%d')}, 2-core VM). "
        f"The role-switching benchmark's load ({args.phase:g} s phases, prompt-heavy -> decode-heavy -> "
        f"prompt-heavy, seed {args.seed}; SLO TTFT <= {roles.TTFT_S:g} s and TPOT <= {roles.TPOT_S * 1000:.0f} ms) "
        "on sim workers under `triphase up`. The planner runs with `--planner-interval 5 --stabilization 60`, "
        "1..8 workers per pool, beside the role balancer. Worker-seconds: worker processes alive (starting and "
        "draining included) integrated over the load. The best static split in hindsight is the smallest one "
        "`triphase plan`'s model predicts to reach 95 % on this very load, with a profile `triphase profile` "
        "measured on a sim worker at the start of the run.",
        "",
        "| configuration | requests | failed | SLO attainment | by phase (P / D / P) | goodput (req/s) | "
        "reaction (shift 1, 2) | reversals | worker-seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, attainment, goodput, by_phase, shown, _, revs, ws, failed in rows:
        lines.append(f"| {run.name} | {len(run.results)} | {failed} | {attainment:.1%} | {by_phase} | "
                     f"{goodput:.2f} | {shown} | {revs} | {ws:.0f} |")
    planned = runs[2].decisions
    if planned:
        lines += ["", "The planner's decisions (seconds into the load): " + "; ".join(
            f"{t:.0f} s {d}" for t, d in planned) + "."]
    lines += ["", "`triphase plan`'s model against the measurement (static splits, the same requests):", "",
              "| split | predicted attainment | measured | error (points) |", "|---|---|---|---|"]
    for p, d, pred, meas in validation:
        lines.append(f"| {p} prefill + {d} decode | {pred:.1%} | {meas:.1%} | {abs(pred - meas) * 100:.1f} |")
    lines += [
        "",
        "| target | result | met? |",
        "|---|---|---|",
        f"| >= 95 % attainment with switching + planner | {planner_row[1]:.1%} | "
        f"{'yes' if planner_row[1] >= 0.95 else 'no'} |",
        f"| worker-seconds <= 1.1x the best static split in hindsight | {planner_row[7]:.0f} vs {hindsight_ws:.0f} "
        f"({ws_ratio:.2f}x) | {'yes' if ws_ratio <= 1.1 else 'no'} |",
        f"| `triphase plan` within 5 points of the measured attainment | "
        f"{', '.join(f'{e:.1f}' for e in errors)} points | {'yes' if max(errors) <= 5 else 'no'} |",
        "",
        "![planner over time](benchmarks/planner.png)",
    ]
    if planner_row[1] < 0.95:
        lines += [
            "",
            f"Why attainment falls short, from the decisions and the timeline: every configuration starts with 8 "
            f"workers where this load needs {hp + hd} (the hindsight split). The planner's first interval (10 s "
            "in) asks for the prefill maximum and the balancer moves decode workers to prefill, but the new "
            "workers serve only after their start-up and the prompt backlog that built meanwhile holds up the "
            "requests behind it, so the first phase is lost until the larger pool has drained it "
            f"({planner_row[3].split(' / ')[0]}). At the shift to decode-heavy load the balancer moves prefill "
            "workers back within seconds, and the planner's extra worker follows an interval later "
            f"({planner_row[3].split(' / ')[1]}); the last phase, with the pools sized, is at "
            f"{planner_row[3].split(' / ')[2]}. A planner reacts to demand: over a three-minute load that opens "
            "undersized, the first reaction alone costs more than 5 % of the requests.",
        ]
    body = "## The planner under a shifting load (issue 11)\n\n" + "\n".join(lines)
    sys.stdout.write(body + "\n")
    if args.no_write:
        return
    fig, axes = figure(3, (15, 4))
    for run in runs:
        axes[0].step([s[0] for s in run.samples], [s[1] for s in run.samples], where="post", label=run.name)
        axes[1].step([s[0] for s in run.samples], [s[2] for s in run.samples], where="post", label=run.name)
        axes[2].plot([t for t, _ in curves[run.name]], [a * 100 for _, a in curves[run.name]], label=run.name)
    for ax in axes:
        for start, _, _ in plan[1:]:
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set(title="worker processes", xlabel="s")
    axes[1].set(title="ready prefill workers (router's view)", xlabel="s")
    axes[2].set(title="SLO attainment, rolling 10 s", xlabel="s", ylabel="%", ylim=(0, 105))
    axes[0].legend(fontsize=7)
    save_figure(fig, axes, ROOT / "benchmarks" / "planner.png")
    update_section("planner", body)


if __name__ == "__main__":
    main()
