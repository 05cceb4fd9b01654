"""How well `triphase plan`'s model predicts measured runs, on the sim engine and on the real model.

For each engine, in one run: `triphase profile` measures one worker with the flags the stack's workers
get (the real model: SmolLM2-135M in float32, one torch thread per process, as each of the stack's two
workers has a core of the two); then `triphase up` with 1 prefill + 1 decode worker serves an open-loop
Poisson load at several rates (the same seed for every rate; each prompt its own, so the prefix cache
does not help; `ignore_eos`, so every request streams its output length). The discrete-event model
(control/simulate.py, what `triphase plan` runs) then takes the very same requests (arrival second,
prompt tokens as the router counted them, output tokens) with the profile and predicts each request's
TTFT and TPOT. Reported per rate: SLO attainment predicted vs measured and the error in points, and the
TTFT/TPOT p50 and p90 of both. Writes the "plan-accuracy" section of BENCHMARKS.md and
benchmarks/plan_accuracy.png.

    python benchmarks/plan_accuracy.py                       # both engines, 60 s per rate
    python benchmarks/plan_accuracy.py --engines model --seconds 30 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pathlib
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request

import aiohttp
import roles
from report import ROOT, figure, log, pct, save_figure, update_section
from stack import profile, router, start_triphase, stop_all, stream_completion

sys.path.insert(0, str(ROOT))
from triphase.common.process.net import free_port
from triphase.common.profile import Profile
from triphase.control.simulate import Request, simulate


@dataclasses.dataclass(frozen=True)
class Setup:
    """One engine's stack, profile and load."""

    name: str
    worker_flags: list[str]  # to `triphase up` and `triphase profile` alike
    profile_flags: list[str]
    ttft_s: float
    tpot_s: float
    words: tuple[int, int]  # prompt words, uniform
    tokens: tuple[int, int]  # output tokens, uniform
    rates: tuple[float, ...]  # requests per second


SETUPS = {
    # The role-switching benchmark's sim timing: 1 ms per prompt token, decode 40 ms + 20 ms per stream.
    "sim": Setup("sim engine", ["--engine", "sim", *roles.TIMING],
                 ["--prompt-lengths", "64,256,512,1024", "--batch-sizes", "1,4,8,12", "--contexts", "64,256",
                  "--decode-steps", "6", "--repeats", "2"],
                 roles.TTFT_S, roles.TPOT_S, (200, 800), (10, 40), (0.5, 1.0, 1.5, 2.0)),
    # SmolLM2-135M in float32 on one core per worker: prefill ~3.7 ms per token, a decode step of ~50 ms
    # for one sequence and ~13 ms more per sequence; prefill and decode each saturate near 1.4 req/s.
    "model": Setup("real model (SmolLM2-135M, float32)", ["--dtype", "float32"],
                   ["--prompt-lengths", "32,128,256,512", "--batch-sizes", "1,2,4,8", "--contexts", "128,512",
                    "--decode-steps", "6", "--repeats", "2"],
                   2.0, 0.15, (60, 300), (16, 48), (0.4, 0.8, 1.2, 1.6)),
}


@dataclasses.dataclass
class Measured:
    arrival: float
    prompt_tokens: int | None
    output_tokens: int
    ttft: float | None
    tpot: float | None
    ok: bool


def arrivals(rate: float, seconds: float, setup: Setup, seed: int) -> list[tuple[float, int, int]]:
    rng = random.Random(seed)
    out, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        out.append((t, rng.randint(*setup.words), rng.randint(*setup.tokens)))
    return out


async def drive(url: str, load: list[tuple[float, int, int]]) -> list[Measured]:
    results: list[Measured] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        model = (await (await session.get(f"{url}/v1/models")).json())["data"][0]["id"]
        started = time.monotonic()

        async def one(arrival: float, words: int, tokens: int) -> None:
            body = {"model": model, "prompt": f"request {arrival:.6f} " + "hello " * words, "max_tokens": tokens,
                    "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            try:
                s = await stream_completion(session, url, body)
            except (aiohttp.ClientError, TimeoutError):
                results.append(Measured(arrival, None, tokens, None, None, False))
                return
            n = s.completion_tokens or 0
            tpot = (s.total - s.ttft) / (n - 1) if s.ttft is not None and n > 1 else None
            results.append(Measured(arrival, s.prompt_tokens, tokens, s.ttft, tpot, n == tokens))

        tasks = []
        for t, words, tokens in load:
            if (delay := started + t - time.monotonic()) > 0:
                await asyncio.sleep(delay)  # the open-loop schedule
            tasks.append(asyncio.create_task(one(t, words, tokens)))
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.arrival)


def measure_profile(setup: Setup, tmp: pathlib.Path) -> Profile:
    log(f"{setup.name}: triphase profile")
    return profile(tmp / f"{setup.name.split()[0]}-profile.json", [*setup.worker_flags, *setup.profile_flags])


class Scraper(threading.Thread):
    """What the workers report while a load runs: the decode worker's (running streams, mean recent step
    seconds) and the prefill worker's prompt tokens per second, every half second."""

    def __init__(self, metrics: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.metrics = metrics
        self.decode: list[tuple[float, float]] = []
        self.prefill_rates: list[float] = []
        self.done = threading.Event()

    @staticmethod
    def _gauge(text: str, name: str) -> float:
        found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def run(self) -> None:
        while not self.done.wait(0.5):
            pages = {role: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                     for role, port in self.metrics.items()}
            streams = self._gauge(pages["decode"], "triphase_worker_running_requests")
            step = self._gauge(pages["decode"], "triphase_worker_decode_step_seconds")
            if streams > 0 and step > 0:
                self.decode.append((streams, step))
            if (rate := self._gauge(pages["prefill"], "triphase_worker_prefill_tokens_per_second")) > 0:
                self.prefill_rates.append(rate)

    def profile(self, isolated: Profile) -> Profile:
        """A profile of the workers as they served: decode steps fitted to the (streams, step) reports,
        prefill at the reported rate (the isolated profile's fixed cost per step kept), context folded
        into the per-stream cost."""
        if not self.prefill_rates or not self.decode:
            raise SystemExit("the calibration load left no prefill rate or decode report to fit")
        per_token = 1.0 / sorted(self.prefill_rates)[len(self.prefill_rates) // 2]
        prefill = [(n, isolated.prefill_base_s + per_token * n) for n in (64, 512)]
        return Profile.fit(prefill, [(b, 0.0, t) for b, t in self.decode], model=isolated.model,
                           engine=f"{isolated.engine} (as served)")


@dataclasses.dataclass
class Row:
    rate: float
    requests: int
    failed: int
    measured: float
    predicted: float  # with the isolated profile (`triphase profile`)
    served: float  # with the profile fitted to what the workers reported while serving
    ttft: tuple[float, float, float, float]  # measured p50, p90; predicted p50, p90
    tpot: tuple[float, float, float, float]


def run_setup(setup: Setup, seconds: float, seed: int, tmp: pathlib.Path) -> tuple[Profile, Profile, list[Row]]:
    isolated = measure_profile(setup, tmp)
    log(f"{setup.name}: {describe(isolated)}")
    rows = []
    metrics = {role: free_port() for role in ("prefill", "decode")}
    procs = []
    try:
        endpoints = []
        for role, port in metrics.items():
            proc, grpc_port = start_triphase(tmp, f"{setup.name.split()[0]}-{role}", [
                "worker", "--role", role, "--port", "0", "--metrics-port", str(port), *setup.worker_flags],
                timeout=180)
            procs.append(proc)
            endpoints.append(f"127.0.0.1:{grpc_port}")
        proc, url = router(tmp, endpoints)
        procs.append(proc)
        # Calibration: a load of its own (another seed, the middle of the rates) with the workers' reports.
        scraper = Scraper(metrics)
        scraper.start()
        asyncio.run(drive(url, arrivals(sum(setup.rates) / len(setup.rates), seconds, setup, seed + 1000)))
        scraper.done.set()
        scraper.join()
        served = scraper.profile(isolated)
        log(f"{setup.name} as served: {describe(served)} ({len(scraper.decode)} decode reports)")
        for rate in setup.rates:
            measured = asyncio.run(drive(url, arrivals(rate, seconds, setup, seed)))
            done = [m for m in measured if m.ok and m.prompt_tokens]
            requests = [Request(m.arrival, int(m.prompt_tokens or 0), m.output_tokens) for m in done]
            model = simulate(isolated, 1, 1, requests)
            met = sum(1 for m in measured if m.ok and m.ttft is not None and m.ttft <= setup.ttft_s
                      and (m.tpot or 0.0) <= setup.tpot_s)
            ttfts = [m.ttft for m in done if m.ttft is not None]
            tpots = [m.tpot for m in done if m.tpot is not None]
            ttft, tpot = ((pct(values, 0.5), pct(values, 0.9), model.percentile(field, 50), model.percentile(field, 90))
                          for values, field in ((ttfts, "ttft_s"), (tpots, "tpot_s")))
            row = Row(rate, len(measured), len(measured) - len(done), met / len(measured),
                      model.attainment(setup.ttft_s, setup.tpot_s),
                      simulate(served, 1, 1, requests).attainment(setup.ttft_s, setup.tpot_s), ttft, tpot)
            log(f"{setup.name} {rate:g} req/s: {row.requests} requests, measured {row.measured:.1%}, predicted "
                f"{row.predicted:.1%} (as served {row.served:.1%}); TTFT p90 {row.ttft[1]:.3f} s vs "
                f"{row.ttft[3]:.3f} s, TPOT p90 {row.tpot[1] * 1e3:.1f} ms vs {row.tpot[3] * 1e3:.1f} ms")
            rows.append(row)
    finally:
        stop_all(procs)
    return isolated, served, rows


def describe(profile: Profile) -> str:
    return (f"prefill {profile.prefill_base_s * 1e3:.1f} ms + {profile.prefill_per_token_s * 1e3:.3f} ms per token; "
            f"decode step {profile.decode_base_s * 1e3:.1f} ms + {profile.decode_per_seq_s * 1e3:.2f} ms per "
            f"sequence + {profile.decode_per_context_token_s * 1e6:.2f} us per context token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sim,model", help="comma-separated: sim, model")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of load per rate")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md and the PNG alone")
    args = parser.parse_args()
    chosen = [SETUPS[name] for name in args.engines.split(",")]
    os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread per process: each worker gets a core of the two
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    results = [(setup, *run_setup(setup, args.seconds, args.seed, tmp)) for setup in chosen]

    lines = [
        f"`python benchmarks/plan_accuracy.py --seconds {args.seconds:g}` — one run ({time.strftime('%Y-%m-%d')}, "
        "2-core VM). Per engine: `triphase profile` of one worker (isolated, in its own process), then 1 prefill "
        f"+ 1 decode worker and a router under {args.seconds:g} s of open-loop Poisson load per rate (seed "
        f"{args.seed}, prompts of their own, `ignore_eos`). The model `triphase plan` runs (control/simulate.py) "
        "is given the same requests (arrival, prompt tokens the router counted, output tokens) and a profile: "
        "the isolated one, and one *as served*, fitted to what the workers reported (decode step time against "
        f"running streams, prefill tokens per second) during a calibration load of {args.seconds:g} s at the "
        "middle rate with another seed. One torch thread per process (`OMP_NUM_THREADS=1`).",
        "",
        "| engine | SLO (TTFT, TPOT) | rate (req/s) | requests | measured attainment | predicted, isolated "
        "profile (error) | predicted, as served (error) | TTFT p50 / p90 measured | predicted (isolated) | "
        "TPOT p50 / p90 measured | predicted (isolated) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors: dict[tuple[str, str], list[float]] = {}
    for setup, _, _, rows in results:
        for row in rows:
            isolated_error, served_error = abs(row.predicted - row.measured) * 100, abs(row.served - row.measured) * 100
            errors.setdefault((setup.name, "isolated profile"), []).append(isolated_error)
            errors.setdefault((setup.name, "profile as served"), []).append(served_error)
            failed = f" ({row.failed} failed)" if row.failed else ""
            lines.append(
                f"| {setup.name} | {setup.ttft_s:g} s, {setup.tpot_s * 1e3:.0f} ms | {row.rate:g} | "
                f"{row.requests}{failed} | {row.measured:.1%} | {row.predicted:.1%} ({isolated_error:.1f}) | "
                f"{row.served:.1%} ({served_error:.1f}) | "
                f"{row.ttft[0]:.2f} / {row.ttft[1]:.2f} s | {row.ttft[2]:.2f} / {row.ttft[3]:.2f} s | "
                f"{row.tpot[0] * 1e3:.0f} / {row.tpot[1] * 1e3:.0f} ms | "
                f"{row.tpot[2] * 1e3:.0f} / {row.tpot[3] * 1e3:.0f} ms |")
    lines += ["", "Profiles of this run:", ""]
    for setup, isolated, served, _ in results:
        lines.append(f"- {setup.name}, isolated: {describe(isolated)}.")
        lines.append(f"- {setup.name}, as served: {describe(served)}.")
    lines += ["", "| target | result | met? |", "|---|---|---|"]
    for (name, label), mine in errors.items():
        lines.append(f"| `triphase plan` within 5 points of the measured attainment ({name}, {label}) | "
                     f"at most {max(mine):.1f} points (mean {sum(mine) / len(mine):.1f}) | "
                     f"{'yes' if max(mine) <= 5 else 'no'} |")
    lines += ["", "![plan accuracy](benchmarks/plan_accuracy.png)"]
    body = "\n".join(lines)
    log(body)
    if args.no_write:
        return
    fig, axes = figure(len(results), (5.5 * len(results), 4.0))
    for ax, (setup, _, _, rows) in zip(axes, results, strict=True):
        rates = [r.rate for r in rows]
        ax.plot(rates, [r.measured * 100 for r in rows], "o-", label="measured")
        ax.plot(rates, [r.predicted * 100 for r in rows], "s--", label="predicted, isolated profile")
        ax.plot(rates, [r.served * 100 for r in rows], "^:", label="predicted, profile as served")
        ax.set_title(f"{setup.name}, 1P + 1D")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.legend()
    save_figure(fig, axes, ROOT / "benchmarks" / "plan_accuracy.png")
    update_section("plan-accuracy", body)


if __name__ == "__main__":
    main()
