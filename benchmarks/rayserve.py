"""triphase on Ray Serve against `triphase up`, same workers, same load, one run (issue 27's benchmark).

1. The real model (SmolLM2-135M, float32), one prefill + one decode worker, no balancer, under each
   runtime: streamed /v1/completions from `--concurrency` clients, `--requests` each run. Per runtime:
   TTFT and TPOT p50/p99, requests/s, and the CPU per request of the front end: `triphase up`'s
   router process against Ray's HTTP proxy plus the ingress replica (the router runs inside it). What
   Serve adds is the difference; Ray's own daemons (GCS, raylet, Serve's controller, the control
   replica) are reported beside it, per second of the run.
2. The shifting load of benchmarks/roles.py (8 sim workers; prompt-heavy, decode-heavy, prompt-heavy)
   on Ray: SLO attainment with role switching against the same deployment with it off.

    python benchmarks/rayserve.py                      # about 12 minutes on 2 cores
    python benchmarks/rayserve.py --phase 20 --no-write

Writes the "Ray Serve" section of BENCHMARKS.md and benchmarks/rayserve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import tempfile
import time

import aiohttp
import psutil
from report import ROOT, cpu_seconds, figure, log, pct, save_figure, update_section
from roles import DECODE_HEAVY, PROMPT_HEAVY, TPOT_S, TTFT_S, Sampler, drive, phases, reaction, rolling
from stack import stream_completion

sys.path.insert(0, str(ROOT))
from tests.ray_local import config, local_ray, replica_processes, serve_run
from triphase.common.process.net import free_port
from triphase.local.processes import triphase_up

REAL = {"engine_kwargs": {"dtype": "float32", "kv_cache_mib": 256},
        "deployment_config": {"num_replicas": 2}, "role_switching": {"enabled": False}}
PROMPT = "Explain in a few sentences why splitting prefill and decode across machines helps LLM serving."
SIM = {"engine_kwargs": {"engine": "sim", "kv_cache_mib": 256,
                         "sim": {"sim_prefill_ms": 0, "sim_prefill_per_token_ms": 1, "sim_decode_ms": 40,
                                 "sim_decode_per_seq_ms": 20}},
       "deployment_config": {"num_replicas": 8, "ray_actor_options": {"num_cpus": 0.25}},
       "slo": {"ttft_seconds": TTFT_S, "tpot_seconds": TPOT_S}}
SWITCHING = {"enabled": True, "max_switches_per_minute": 12, "cooldown_seconds": 20}


async def closed_loop(url: str, requests: int, concurrency: int, tokens: int) -> tuple[list, float]:  # type: ignore[type-arg]
    """`requests` streamed completions, `concurrency` at a time; (Streamed per request, seconds)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        model = (await (await session.get(f"{url}/v1/models")).json())["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        queue = iter(range(requests))
        out = []

        async def lane() -> None:
            for _ in queue:
                out.append(await stream_completion(session, url, body))

        started = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return out, time.monotonic() - started


def summary(streams: list, seconds: float) -> dict[str, float]:  # type: ignore[type-arg]
    ttft = [s.ttft for s in streams if s.ttft is not None]
    tpot = [(s.total - s.ttft) / (s.completion_tokens - 1) for s in streams
            if s.ttft is not None and (s.completion_tokens or 0) > 1]
    return {"ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "tpot_p50": pct(tpot, 0.5),
            "tpot_p99": pct(tpot, 0.99), "rps": len(streams) / seconds, "n": len(streams)}


def cpu_of(procs: list[psutil.Process]) -> float:
    return sum(cpu_seconds(p.pid) for p in procs if p.is_running())


def ray_front_end() -> list[psutil.Process]:
    """Serve's HTTP proxy and the ingress replica: what a request passes through before the workers."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "ray::ProxyActor" in line or "ServeReplica:triphase:Ingress" in line:
            found.append(proc)
    return found


def ray_daemons() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if any(k in line for k in ("gcs_server", "raylet", "ray::ServeController", "ServeReplica:triphase:Control")):
            found.append(proc)
    return found


def measure_real(tmp: pathlib.Path, env: dict[str, str], requests: int, concurrency: int, tokens: int) -> dict:  # type: ignore[type-arg]
    results = {}
    log("triphase up: 1 prefill + 1 decode (float32)")
    with triphase_up(["--dtype", "float32", "--kv-cache-mib", "256"]) as (proc, url):
        asyncio.run(closed_loop(url, 4, 2, tokens))  # warm up
        router = next(p for p in psutil.Process(proc.pid).children() if "router" in p.cmdline())
        before = cpu_seconds(router.pid)
        streams, seconds = asyncio.run(closed_loop(url, requests, concurrency, tokens))
        front_ms = (cpu_seconds(router.pid) - before) / requests * 1e3
        results["up"] = {**summary(streams, seconds), "front_cpu_ms": front_ms, "daemons_cpu_s_per_s": 0.0}
    log("Ray Serve: serve run of deploy/ray/serve.yaml, the same two workers")
    with serve_run(config(tmp, free_port(), **REAL), env, tmp / "serve-real.log", 2) as (_, url):
        asyncio.run(closed_loop(url, 4, 2, tokens))
        front, daemons = ray_front_end(), ray_daemons()
        before, before_daemons = cpu_of(front), cpu_of(daemons)
        streams, seconds = asyncio.run(closed_loop(url, requests, concurrency, tokens))
        results["ray"] = {**summary(streams, seconds), "front_cpu_ms": (cpu_of(front) - before) / requests * 1e3,
                          "daemons_cpu_s_per_s": (cpu_of(daemons) - before_daemons) / seconds}
    return results


def measure_shifting(tmp: pathlib.Path, env: dict[str, str], phase: float, seed: int) -> dict:  # type: ignore[type-arg]
    plan = phases(phase, 1.0)
    runs = {}
    for name, switching in (("fixed", {"enabled": False}), ("switching", SWITCHING)):
        log(f"Ray Serve, 8 sim workers, roles {name}: {plan[-1][1]:.0f} s of shifting load")
        path = config(tmp, free_port(), **SIM, role_switching=switching)
        with serve_run(path, env, tmp / f"serve-{name}.log", 8) as (_, url):
            sampler = Sampler(url, None)
            sampler.start()
            results = asyncio.run(drive(url, plan, seed))
            sampler.done.set()
            sampler.join()
        runs[name] = (results, sampler.samples)
    return {"plan": plan, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--phase", type=float, default=40.0, help="seconds per phase of the shifting load")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rayserve-bench-"))
    with local_ray(tmp / "ray") as env:
        real = measure_real(tmp, env, args.requests, args.concurrency, args.tokens)
        shifting = measure_shifting(tmp, env, args.phase, args.seed)
    left = replica_processes()
    for name, r in real.items():
        log(f"{name}: {json.dumps({k: round(v, 4) for k, v in r.items()})}")
    plan, end = shifting["plan"], shifting["plan"][-1][1]
    rows = []
    for name, (results, _) in shifting["runs"].items():
        met = sum(r.met for r in results) / max(len(results), 1)
        by_phase = []
        for start, stop, _ in plan:
            inside = [r for r in results if start <= r.arrival < stop]
            by_phase.append(f"{sum(r.met for r in inside) / max(len(inside), 1):.0%}")
        curve = rolling(results, end)
        reactions = [reaction(curve, start, stop) for start, stop, _ in plan[1:]]
        rows.append((name, len(results), sum(not r.ok for r in results), met, " / ".join(by_phase),
                     ", ".join("never" if x is None else f"{x:.0f} s" for x in reactions)))
        log(f"{name}: attainment {met:.1%} ({' / '.join(by_phase)})")
    if args.no_write:
        return
    up, ray = real["up"], real["ray"]
    added = ray["front_cpu_ms"] - up["front_cpu_ms"]
    lines = [
        f"`python benchmarks/rayserve.py --requests {args.requests} --concurrency {args.concurrency} --tokens "
        f"{args.tokens} --phase {args.phase:g}` — one run ({time.strftime('%Y-%m-%d')}, 2-core VM, Ray "
        "2.60, a local head node). Everything shares the two cores: compare within the table.",
        "",
        f"**Same workers** (SmolLM2-135M float32, 1 prefill + 1 decode on the CPU, NIXL hand-off), "
        f"{args.requests} streamed completions of {args.tokens} tokens, {args.concurrency} at a time:",
        "",
        "| runtime | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | requests/s | front-end CPU per request |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label, front in (("up", "`triphase up`", "router process"),
                               ("ray", "Ray Serve (`serve run`)", "HTTP proxy + ingress replica")):
        r = real[name]
        lines.append(f"| {label} | {r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | "
                     f"{r['tpot_p50'] * 1e3:.1f} ms | {r['tpot_p99'] * 1e3:.1f} ms | {r['rps']:.2f} | "
                     f"{r['front_cpu_ms']:.1f} ms ({front}) |")
    lines += [
        "",
        f"What Serve's proxy and handles add per request: **{added:+.1f} ms of CPU** "
        f"({ray['front_cpu_ms'] / max(up['front_cpu_ms'], 1e-9):.1f}x the router alone: the HTTP proxy, the "
        "proxy -> ingress handle call, and the loopback hop into the router, rayserve/proxy.py); TTFT p50 "
        f"{(ray['ttft_p50'] - up['ttft_p50']) * 1e3:+.0f} ms, TPOT p50 "
        f"{(ray['tpot_p50'] - up['tpot_p50']) * 1e3:+.1f} ms. "
        f"Ray's daemons (GCS, raylet, Serve's controller, the control replica) used {ray['daemons_cpu_s_per_s']:.2f} "
        "CPU-seconds per second during the run.",
        "",
        f"**Shifting load on Ray** (benchmarks/roles.py's plan and SLO: 8 sim workers, 4 prefill + 4 decode "
        f"first; {args.phase:g} s per phase, prompt-heavy ({PROMPT_HEAVY[0]}-word prompts, {PROMPT_HEAVY[1]} "
        f"tokens) -> decode-heavy ({DECODE_HEAVY[0]}-word prompts, {DECODE_HEAVY[1]} tokens) -> prompt-heavy; "
        f"TTFT <= {TTFT_S:g} s and TPOT <= {TPOT_S * 1e3:.0f} ms):",
        "",
        "| roles | requests | failed | SLO attainment | by phase (P / D / P) | reaction (shift 1, 2) |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {n} | {failed} | {met:.1%} | {phased} | {shown} |"
          for name, n, failed, met, phased, shown in rows),
        "",
        f"Replica processes left after the runs: {len(left)}.",
        "",
        "![Ray Serve](benchmarks/rayserve.png)",
    ]
    update_section("rayserve", "## Ray Serve\n\n" + "\n".join(lines))
    fig, axes = figure(2, (11, 3.6))
    for name, (results, _) in shifting["runs"].items():
        curve = rolling(results, end)
        axes[0].plot([t for t, _ in curve], [a for _, a in curve], label=name)
        axes[1].plot([s[0] for s in shifting["runs"][name][1]], [s[1] for s in shifting["runs"][name][1]],
                     label=name)
    for start, _, _ in plan[1:]:
        for ax in axes:
            ax.axvline(start, color="grey", lw=0.8, ls="--")
    axes[0].set(title="rolling 10 s SLO attainment on Ray Serve", xlabel="s", ylabel="attainment")
    axes[1].set(title="prefill workers", xlabel="s", ylabel="workers")
    for ax in axes:
        ax.legend()
    save_figure(fig, axes, ROOT / "benchmarks" / "rayserve.png")


if __name__ == "__main__":
    main()
