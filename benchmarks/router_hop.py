"""Router hop: what the router adds to a request, triphase vs PyPI `vllm-router`, one run.

Both routers front a backend with the same timing: 10 ms of prefill, then 16 tokens 10 ms apart
(ideal: TTFT 10 ms, total 170 ms).
  mock direct:        the client talks to a mock OpenAI server (aiohttp SSE) with that timing;
  vllm-router + mock: vllm-router (round robin) in front of the same mock;
  triphase:           `triphase router` in front of one `--engine sim` worker with that timing
                      (real gRPC, scheduling and continuous batching; steps are 10 ms, so a request
                      that arrives mid-step waits for the next one: up to +10 ms TTFT by design).
500 streamed /v1/completions requests at concurrency 1, 16 and 64 from an aiohttp client in this
process; p50/p99 TTFT (first content chunk) and total, requests/s, and the router's CPU seconds per
request (utime + stime from /proc). vllm-router is installed into its own venv under the cache.
Then the triphase path is taken apart: TTFT of the sim engine in-process, over its gRPC server, and
the slowest TTFT of a wave of 64 requests arriving at once, straight to the worker and via the router,
and where the router spends its CPU at concurrency 64 (py-spy, in a run of its own).

    python benchmarks/router_hop.py [--requests 500] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from report import ROOT, cpu_seconds, figure, log, pct, save_figure, update_section
from stack import http_ok, router, spawn, stop_all, stream_completion, wait_until, worker

from triphase.common.process.net import free_port

CONCURRENCY = (1, 16, 64)
TOKENS = 16
STEP_S = 0.010
VLLM_ROUTER = "vllm-router==0.1.17"


# ------------------------------------------------------------------------------ the mock backend
def mock_server(port: int) -> None:
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(STEP_S)  # prefill
        for i in range(TOKENS):
            if i:
                await asyncio.sleep(STEP_S)
            chunk = {"id": "cmpl-mock", "object": "text_completion", "model": "mock",
                     "choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == TOKENS - 1
                                  else None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    for path in ("/health", "/v1/models", "/get_server_info", "/get_model_info"):
        app.router.add_get(path, ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


# ------------------------------------------------------------------------------ load
async def load(url: str, model: str, requests: int, concurrency: int) -> dict:  # type: ignore[type-arg]
    import aiohttp

    ttfts: list[float] = []
    totals: list[float] = []
    body = {"model": model, "prompt": "hello", "max_tokens": TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                queue.pop()
                run = await stream_completion(session, url, body)
                totals.append(run.total)
                ttfts.append(run.ttft if run.ttft is not None else float("nan"))
                if run.chunks == 0:
                    raise RuntimeError(f"no content from {url}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"ttft": ttfts, "total": totals, "elapsed": elapsed}


# ------------------------------------------------------------------------------ where the time goes
async def _sim_in_process(requests: int) -> list[float]:
    """TTFT of the sim engine with no gRPC: the worker's engine thread and asyncio hand-off only."""
    from triphase.workers.engine.async_engine import AsyncEngine
    from triphase.workers.engine.core import EngineConfig
    from triphase.workers.engine.sampling import SamplingParams
    from triphase.workers.engine.sim import SimTiming, simulated_engine

    engine = AsyncEngine(simulated_engine(None, EngineConfig(), SimTiming(STEP_S, 0.0, STEP_S)))
    engine.start()
    ttfts = []
    try:
        for i in range(requests):  # each stream read to its end, as a client does
            start, first = time.perf_counter(), None
            async for _ in engine.generate(f"in-process-{i}", [1, 2, 3],
                                           SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)):
                first = first or time.perf_counter() - start
            ttfts.append(first or float("nan"))
    finally:
        await engine.stop()
    return ttfts


async def _grpc(endpoint: str, requests: int, concurrency: int) -> list[float]:
    """TTFT of Generate called straight on the sim worker (a grpc.aio client, no router)."""
    from triphase.router.worker_client import Sampling, WorkerClient

    client = WorkerClient()
    sampling = Sampling(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> float:  # the stream read to its end, as a client does
        start, first = time.perf_counter(), None
        async with contextlib.aclosing(client.generate(endpoint, f"direct-{time.time_ns()}-{i}", [1, 2, 3],
                                                       sampling)) as deltas:
            async for delta in deltas:
                if delta.token_ids and first is None:
                    first = time.perf_counter() - start
        return first if first is not None else float("nan")

    ttfts: list[float] = []
    try:
        for first in range(0, requests, concurrency):
            ttfts += await asyncio.gather(*(one(i) for i in range(first, first + concurrency)))
    finally:
        await client.close()
    return ttfts


def decompose(endpoint: str, url: str) -> dict[str, float]:
    """TTFT of the triphase path piece by piece: the sim engine alone, its gRPC server, and a wave
    of 64 requests arriving at once (the slowest of each wave), straight to the worker and through
    the router."""
    waves_direct = [max(asyncio.run(_grpc(endpoint, 64, 64))) for _ in range(3)]
    waves_router = [max(asyncio.run(load(url, "SmolLM2-135M-Instruct", 64, 64))["ttft"]) for _ in range(3)]
    return {"in_process_p50": pct(asyncio.run(_sim_in_process(50)), 0.5),
            "grpc_p50": pct(asyncio.run(_grpc(endpoint, 50, 1)), 0.5),
            "wave_direct_max": sorted(waves_direct)[1], "wave_router_max": sorted(waves_router)[1]}


# ------------------------------------------------------------------------------ profile
@contextlib.contextmanager
def profiled(pid: int, out: pathlib.Path):  # type: ignore[no-untyped-def]
    """py-spy samples `pid` (its Python stacks, idle threads left out) while the block runs."""
    spy = pathlib.Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                             "--full-filenames", "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        proc.wait(timeout=60)


def where_cpu_goes(raw: pathlib.Path) -> dict[str, float]:
    """Share of the samples by where the innermost Python frame is: a package (grpc, aiohttp, asyncio,
    protobuf, ...) or, in triphase, its module."""
    shares: dict[str, float] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        path = leaf[leaf.find("(") + 1:leaf.rfind(":")] if "(" in leaf else leaf
        shares[_area(path)] = shares.get(_area(path), 0) + int(count)
        total += int(count)
    return {area: n / total for area, n in sorted(shares.items(), key=lambda kv: -kv[1])} if total else {}


def _area(path: str) -> str:
    """A package for installed code (grpc, aiohttp, ...), `triphase <module>` for ours, the event loop
    for asyncio and its selectors, else the file."""
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/src/triphase/" in path:
        return "triphase " + path.rsplit("/src/triphase/", 1)[1].removesuffix(".py")
    if "/asyncio/" in path or path.endswith("/selectors.py"):
        return "asyncio (event loop, sockets)"
    return path.rsplit("/", 1)[-1]


# ------------------------------------------------------------------------------ systems
def vllm_router_bin() -> str:
    venv = pathlib.Path(os.environ.get("TRIPHASE_CACHE", pathlib.Path.home() / ".cache" / "triphase")) / \
        f"bench-{VLLM_ROUTER.replace('==', '-')}"
    binary = venv / "bin" / "vllm-router"
    if not binary.exists():
        log(f"installing {VLLM_ROUTER} into {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", VLLM_ROUTER], check=True)
    return str(binary)


def measure(requests: int) -> dict:  # type: ignore[type-arg]
    import multiprocessing as mp

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="router-hop-"))
    results: dict = {}  # type: ignore[type-arg]
    procs: list = []  # type: ignore[type-arg]
    try:
        mock_port = free_port()
        mock = mp.get_context("spawn").Process(target=mock_server, args=(mock_port,), daemon=True)
        mock.start()
        mock_url = f"http://127.0.0.1:{mock_port}"
        wait_until(lambda: http_ok(f"{mock_url}/health"), 60, "the mock server")

        vr_port = free_port()
        vr = spawn([vllm_router_bin(), "--worker-urls", mock_url, "--port", str(vr_port), "--host", "127.0.0.1",
                    "--policy", "round_robin", "--log-level", "warning"], tmp / "vllm-router.log")
        procs.append(vr)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{vr_port}/health"), 60, "vllm-router")

        sim, endpoint = worker(tmp, "worker", [
            "--engine", "sim", "--role", "both", "--sim-prefill-ms", "10", "--sim-decode-ms", "10",
            "--metrics-port", "-1", "--max-num-seqs", "128",
            "--kv-transfer", "grpc"])  # one worker, no hand-off: no NIXL agent (its UCX thread spins)
        procs.append(sim)
        triphase, tr_url = router(tmp, [endpoint])
        procs.append(triphase)

        systems = {
            "mock direct": (mock_url, "mock", None),
            "vllm-router + mock": (f"http://127.0.0.1:{vr_port}", "mock", vr.pid),
            "triphase router + sim": (tr_url, "SmolLM2-135M-Instruct", triphase.pid),
        }
        for name, (url, model, pid) in systems.items():
            asyncio.run(load(url, model, 50, 8))  # warm-up
            for c in CONCURRENCY:
                cpu0 = cpu_seconds(pid) if pid else 0.0
                run = asyncio.run(load(url, model, requests, c))
                cpu = (cpu_seconds(pid) - cpu0) / requests if pid else None
                row = {"p50_ttft": pct(run["ttft"], 0.5), "p99_ttft": pct(run["ttft"], 0.99),
                       "p50_total": pct(run["total"], 0.5), "p99_total": pct(run["total"], 0.99),
                       "rps": requests / run["elapsed"], "cpu_per_request": cpu}
                results.setdefault(name, {})[c] = row
                log(f"{name:24s} c={c:2d}: TTFT p50 {row['p50_ttft'] * 1e3:6.1f} p99 {row['p99_ttft'] * 1e3:6.1f} ms, "
                    f"total p50 {row['p50_total'] * 1e3:6.1f} p99 {row['p99_total'] * 1e3:6.1f} ms, "
                    f"{row['rps']:6.1f} req/s" + (f", router CPU {cpu * 1e3:.2f} ms/req" if cpu else ""))
        log(f"profiling the triphase router at concurrency {max(CONCURRENCY)} (a run of its own: sampling slows it)")
        with profiled(triphase.pid, tmp / "router.spy"):
            asyncio.run(load(tr_url, "SmolLM2-135M-Instruct", requests, max(CONCURRENCY)))
        results["profile"] = where_cpu_goes(tmp / "router.spy")
        log("decomposing the triphase path")
        results["decomposition"] = decompose(endpoint, tr_url)
    finally:
        stop_all(procs)
    return results


def plot(results: dict, path: pathlib.Path) -> None:  # type: ignore[type-arg]
    fig, axes = figure(2, (10, 4))
    for name, rows in results.items():
        if name in ("decomposition", "profile"):
            continue
        cs = sorted(rows)
        axes[0].plot(cs, [rows[c]["p99_ttft"] * 1e3 for c in cs], "o-", label=name)
        axes[1].plot(cs, [rows[c]["rps"] for c in cs], "o-", label=name)
    axes[0].set(xlabel="concurrency", ylabel="p99 TTFT (ms)", title="p99 time to first token", xscale="log")
    axes[1].set(xlabel="concurrency", ylabel="requests/s", title="throughput", xscale="log")
    save_figure(fig, axes, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = measure(args.requests)
    ideal_ttft, ideal_total = STEP_S, STEP_S * TOKENS + STEP_S
    lines = [
        "## Router hop: triphase vs vllm-router (issues 3 and 28)", "",
        f"`python benchmarks/router_hop.py --requests {args.requests}` — one run, 2 cores shared by client, "
        f"router and backend. Backend timing: 10 ms prefill, {TOKENS} tokens 10 ms apart (ideal TTFT "
        f"{ideal_ttft * 1e3:.0f} ms, total {ideal_total * 1e3:.0f} ms). {args.requests} streamed requests per row.",
        "",
        "| system | concurrency | TTFT p50 | TTFT p99 | total p50 | total p99 | req/s | router CPU / request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    parts = results.pop("decomposition")
    profile = results.pop("profile")
    for name, rows in results.items():
        for c, r in sorted(rows.items()):
            cpu = f"{r['cpu_per_request'] * 1e3:.2f} ms" if r["cpu_per_request"] is not None else "-"
            lines.append(f"| {name} | {c} | {r['p50_ttft'] * 1e3:.1f} ms | {r['p99_ttft'] * 1e3:.1f} ms | "
                         f"{r['p50_total'] * 1e3:.1f} ms | {r['p99_total'] * 1e3:.1f} ms | {r['rps']:.1f} | {cpu} |")
    ours, theirs, direct = results["triphase router + sim"], results["vllm-router + mock"], results["mock direct"]
    added = ours[1]["p50_ttft"] - direct[1]["p50_ttft"]
    lines += [
        "",
        f"- p50 TTFT added at concurrency 1 over the mock served directly to the same client (the client's own "
        f"overhead taken out): triphase {added * 1e3:+.1f} ms, vllm-router "
        f"{(theirs[1]['p50_ttft'] - direct[1]['p50_ttft']) * 1e3:+.1f} ms; over the ideal {ideal_ttft * 1e3:.0f} ms: "
        f"triphase {(ours[1]['p50_ttft'] - ideal_ttft) * 1e3:+.1f} ms, vllm-router "
        f"{(theirs[1]['p50_ttft'] - ideal_ttft) * 1e3:+.1f} ms, mock direct "
        f"{(direct[1]['p50_ttft'] - ideal_ttft) * 1e3:+.1f} ms. Target <= +1 ms: "
        f"{'met' if added <= 0.001 else 'NOT met'}.",
        f"- the slowest TTFT of a burst of 64 arriving at once (median of 3 bursts): "
        f"{parts['wave_router_max'] * 1e3:.0f} ms through the router vs {parts['wave_direct_max'] * 1e3:.0f} ms "
        f"straight to the worker = {(parts['wave_router_max'] - parts['wave_direct_max']) * 1e3:+.0f} ms (target "
        f"<= +5 ms: {'met' if parts['wave_router_max'] - parts['wave_direct_max'] <= 0.005 else 'NOT met'}).",
        f"- router CPU per request at 64: triphase {ours[64]['cpu_per_request'] * 1e3:.2f} ms vs vllm-router "
        f"{theirs[64]['cpu_per_request'] * 1e3:.2f} ms = "
        f"{ours[64]['cpu_per_request'] / theirs[64]['cpu_per_request']:.1f}x (target <= 1.5x: "
        f"{'met' if ours[64]['cpu_per_request'] <= 1.5 * theirs[64]['cpu_per_request'] else 'NOT met'}).",
        f"- where triphase's TTFT goes (p50 of 50 requests one at a time): the sim engine in-process "
        f"{parts['in_process_p50'] * 1e3:.2f} ms, through its gRPC server {parts['grpc_p50'] * 1e3:.2f} ms, "
        f"through router + gRPC {ours[1]['p50_ttft'] * 1e3:.2f} ms (above).",
        f"- where the router's CPU goes at concurrency {max(CONCURRENCY)} (py-spy, share of samples by the "
        f"innermost Python frame): " + ", ".join(f"{area} {share:.0%}" for area, share in list(profile.items())[:12])
        + ".",
        "", "![router hop](benchmarks/router_hop.png)",
    ]
    body = "\n".join(lines)
    sys.stdout.write(body + "\n")
    (ROOT / "benchmarks" / "router_hop.json").write_text(json.dumps({**results, "decomposition": parts,
                                                                     "profile": profile}, indent=1))
    if not args.no_write:
        plot(results, ROOT / "benchmarks" / "router_hop.png")
        update_section("router-hop", body)
        log("wrote BENCHMARKS.md, benchmarks/router_hop.png, benchmarks/router_hop.json")


if __name__ == "__main__":
    main()
