"""KV hand-off bandwidth: NIXL READ vs the gRPC stream vs in-process memcpy (the bound), one run.

A source process holds a KV tensor with the bundled model's real layout (30 layers, 3 KV heads,
head_dim 64, bfloat16, 16-token blocks) behind its own NIXL agent and a gRPC server answering
ReadKv with the workers' `grpc_stream.chunks`. This process (the "decode worker") moves the blocks
of one request of 128 ... 8192 prompt tokens into its own KV tensor:
  memcpy: the same contiguous runs copied from a local tensor (no process boundary; the bound),
  nixl:   NixlConnector.read (what `triphase worker --kv-transfer nixl` does),
  grpc:   grpc_stream.pull + index_copy into the cache (the fallback connector).
Destination blocks are scattered in two runs, as after some cache churn. Also measures the prefill
time of a 2048-token prompt on the engine (default bf16 + int4) to put the hand-off beside TTFT.
Writes the "KV hand-off" section of BENCHMARKS.md and benchmarks/kv_transfer.png.

    python benchmarks/kv_transfer.py [--repeats 9] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time

from report import ROOT, best_time, cpu_seconds, figure, log, save_figure, update_section

TOKENS = (128, 512, 1024, 2048, 4096, 8192)
BLOCK_SIZE = 16
IDLE_S = 3.0


def _layout(num_blocks: int):  # type: ignore[no-untyped-def]
    from triphase.workers.engine.kv_layout import KvLayout

    return KvLayout(num_blocks, 30, BLOCK_SIZE, 3, 64, "bfloat16")


def _source(conn, num_blocks: int) -> None:  # type: ignore[no-untyped-def]
    """The prefill side: KV tensor + NIXL agent + a gRPC ReadKv server."""
    import grpc
    import torch

    from triphase.api.v1 import worker_pb2 as pb
    from triphase.api.v1 import worker_pb2_grpc
    from triphase.workers.engine.model_runner import allocate_kv
    from triphase.workers.kv import grpc_stream
    from triphase.workers.kv.nixl import NixlConnector

    layout = _layout(num_blocks)
    kv = allocate_kv(layout.shape, torch.bfloat16)  # as a worker allocates its KV cache
    kv.copy_(torch.randn(layout.shape, dtype=torch.float32))
    nixl = NixlConnector("bench-source", kv, layout)

    class ReadOnly(worker_pb2_grpc.WorkerServiceServicer):
        async def ReadKv(self, request, context):  # type: ignore[no-untyped-def]
            count = int(request.request_id)  # the benchmark names a request by its block count
            data = kv[:count]
            for offset, n, payload in grpc_stream.chunks(data, layout.block_bytes, request.max_chunk_bytes):
                yield pb.KvChunk(block_offset=offset, num_blocks=n, data=payload)

    async def serve() -> None:
        server = grpc.aio.server(options=grpc_stream.CHANNEL_OPTIONS)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(ReadOnly(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        checksum = float(kv[: num_blocks].float().sum())
        conn.send((nixl.metadata, nixl.base_address, port, checksum))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the benchmark is done
        await server.stop(None)

    asyncio.run(serve())


def measure(repeats: int) -> dict:  # type: ignore[type-arg]
    import torch

    from triphase.api.v1 import worker_pb2 as pb
    from triphase.common.worker_stubs import WorkerStubs
    from triphase.workers.engine.kv_layout import transfer_plan
    from triphase.workers.engine.model_runner import allocate_kv
    from triphase.workers.kv import grpc_stream
    from triphase.workers.kv.nixl import NixlConnector

    # One copy thread, as NIXL's READ is one copy (process_vm_readv-style) on this host.
    torch.set_num_threads(1)
    max_blocks = max(TOKENS) // BLOCK_SIZE
    total = 2 * max_blocks + 8
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    source = ctx.Process(target=_source, args=(child, max_blocks), daemon=True)
    source.start()
    metadata, base, port, _ = parent.recv()
    layout = _layout(total)
    cache = allocate_kv(layout.shape, torch.bfloat16)
    local_src = torch.randn((max_blocks, *layout.shape[1:]), dtype=torch.float32).to(torch.bfloat16)
    nixl = NixlConnector("bench-dest", cache, layout)
    loop = asyncio.new_event_loop()
    pool = WorkerStubs(options=grpc_stream.CHANNEL_OPTIONS)
    rows = []
    try:
        for tokens in TOKENS:
            n = tokens // BLOCK_SIZE
            src_blocks = list(range(n))
            half = n // 2  # two destination runs, far apart
            dst_blocks = list(range(4, 4 + half)) + list(range(max_blocks + 4, max_blocks + 4 + n - half))
            plan = transfer_plan(src_blocks, dst_blocks)
            nbytes = n * layout.block_bytes

            def memcpy(plan=plan) -> None:
                for s, d, count in plan:  # the runs NIXL reads, copied in-process
                    cache[d : d + count].copy_(local_src[s : s + count])

            def nixl_read(n=n, dst_blocks=dst_blocks, src_blocks=src_blocks) -> None:
                nixl.read(metadata, base, src_blocks, dst_blocks)

            def grpc_read(n=n, plan=plan) -> None:
                kv = pb.KvTransferParams(request_id=str(n))
                data, _ = loop.run_until_complete(grpc_stream.pull(pool, f"127.0.0.1:{port}", kv, layout, n))
                for s, d, count in plan:  # into the cache, as ModelRunner.write_blocks does
                    cache[d : d + count].copy_(data[s : s + count])

            row = {"tokens": tokens, "bytes": nbytes}
            for name, fn in (("memcpy", memcpy), ("nixl", nixl_read), ("grpc", grpc_read)):
                row[name] = best_time(fn, repeats)
            log(f"{tokens:5d} tokens ({nbytes / 2**20:6.1f} MiB): memcpy {row['memcpy'] * 1e3:7.2f} ms, "
                f"nixl {row['nixl'] * 1e3:7.2f} ms, grpc {row['grpc'] * 1e3:7.2f} ms")
            rows.append(row)
        # the bytes NIXL moved are the source's bytes
        n = max_blocks
        nixl.read(metadata, base, list(range(n)), list(range(n)))
        moved_ok = bool(torch.isfinite(cache[:n].float()).all())
        # an idle agent (its UCX progress thread) should cost next to nothing
        before, started = cpu_seconds(source.pid), time.perf_counter()
        time.sleep(IDLE_S)  # the measurement window itself
        idle_share = (cpu_seconds(source.pid) - before) / (time.perf_counter() - started)
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
        parent.send("done")
        source.join(timeout=30)
    return {"rows": rows, "nixl_data_finite": moved_ok, "idle_source_cpu": idle_share}


def prefill_seconds(tokens: int) -> float:
    """Prefill time (= TTFT on an idle worker) of a `tokens`-token prompt, default engine settings."""
    import torch

    from triphase.workers.engine.core import Engine, EngineConfig
    from triphase.workers.engine.sampling import SamplingParams

    torch.set_num_threads(2)
    engine = Engine.from_path(None, EngineConfig(kv_cache_bytes=256 << 20))  # the worker defaults (512-token chunks)
    prompt = [(i * 7919) % 40000 + 100 for i in range(tokens)]
    sampling = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.generate([prompt[:256]], sampling)  # warm-up
    best = float("inf")
    for attempt in range(2):
        prompt[0] += attempt + 1  # no prefix-cache hit
        start = time.perf_counter()
        engine.generate([prompt], sampling)
        best = min(best, time.perf_counter() - start)
    return best


def plot(rows, path) -> None:  # type: ignore[no-untyped-def]
    fig, (ax,) = figure(1, (7, 4))
    tokens = [r["tokens"] for r in rows]
    for name, style in (("memcpy", "k--"), ("nixl", "o-"), ("grpc", "s-")):
        ax.plot(tokens, [r["bytes"] / r[name] / 1e9 for r in rows], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens handed off")
    ax.set_ylabel("GB/s")
    ax.set_title("KV hand-off bandwidth (SmolLM2-135M layout, bf16, 2 cores)")
    save_figure(fig, [ax], path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    log("measuring hand-off bandwidth")
    result = measure(args.repeats)
    log("measuring prefill time of a 2048-token prompt")
    ttft = prefill_seconds(2048)
    rows = result["rows"]
    at2k = next(r for r in rows if r["tokens"] == 2048)
    lines = [
        "## KV hand-off: NIXL vs gRPC stream vs memcpy (issue 3)", "",
        f"`python benchmarks/kv_transfer.py --repeats {args.repeats}` — one run, best of {args.repeats} "
        "transfers each, 2 cores. One request's blocks move from a source process (NIXL agent + gRPC ReadKv) "
        "into this process's KV cache; memcpy copies the same contiguous runs in-process (the bound).", "",
        "| prompt tokens | MiB | memcpy GB/s | NIXL GB/s | gRPC GB/s | NIXL / memcpy | NIXL / gRPC |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = {k: r["bytes"] / r[k] / 1e9 for k in ("memcpy", "nixl", "grpc")}
        lines.append(f"| {r['tokens']} | {r['bytes'] / 2**20:.1f} | {rate['memcpy']:.2f} | {rate['nixl']:.2f} | "
                     f"{rate['grpc']:.2f} | {100 * rate['nixl'] / rate['memcpy']:.0f} % | "
                     f"{rate['nixl'] / rate['grpc']:.1f}x |")
    from_1k = [r for r in rows if r["tokens"] >= 1024]
    worst = min(r["memcpy"] / r["nixl"] for r in from_1k)
    lines += [
        "",
        f"Target NIXL >= 50 % of memcpy from 1k tokens: worst case {100 * worst:.0f} % "
        f"({'met' if worst >= 0.5 else 'NOT met'}).",
        f"Target hand-off <= 10 % of TTFT at 2k tokens: NIXL moves 2048 tokens' KV in {at2k['nixl'] * 1e3:.1f} ms; "
        f"prefill of 2048 tokens (TTFT on an idle worker, bf16 + int4) takes {ttft * 1e3:.0f} ms, so the hand-off "
        f"is {100 * at2k['nixl'] / ttft:.1f} % of TTFT ({'met' if at2k['nixl'] <= 0.1 * ttft else 'NOT met'}; "
        f"gRPC: {100 * at2k['grpc'] / ttft:.1f} %).",
        f"An idle source process (NIXL agent with its UCX progress thread, gRPC server) uses "
        f"{100 * result['idle_source_cpu']:.0f} % of a core over {IDLE_S:.0f} s.",
        "", "![KV hand-off bandwidth](benchmarks/kv_transfer.png)",
    ]
    body = "\n".join(lines)
    sys.stdout.write(body + "\n")
    (ROOT / "benchmarks" / "kv_transfer.json").write_text(json.dumps({**result, "prefill_2048_s": ttft}, indent=1))
    if not args.no_write:
        plot(rows, ROOT / "benchmarks" / "kv_transfer.png")
        update_section("kv-transfer", body)
        log("wrote BENCHMARKS.md, benchmarks/kv_transfer.png, benchmarks/kv_transfer.json")


if __name__ == "__main__":
    main()
