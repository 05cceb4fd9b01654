"""Engine benchmark: triphase vs Hugging Face transformers on the bundled model, one run, same threads.

Measures, for each configuration in its own fresh process (so peak RSS is its own):
  prefill tokens/s for a 512-token prompt, decode tokens/s at batch 1, 8, 32, 64, peak RSS;
and the physical bound for batch-1 decode: memory bandwidth (a large memcpy, counting bytes read +
written) / bytes of weights one decode step reads. Writes the "Engine" section of BENCHMARKS.md and
benchmarks/engine.png.

    make bench                       # or: python benchmarks/engine.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from report import ROOT, log, update_section

BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 512
DECODE_TOKENS = 48
REPEATS = 3  # decode rates are the best of this many runs (this VM's neighbours add +-20 % noise)
KV_BLOCKS = 320  # 64 requests x 64 tokens + one 512-token prompt, in 16-token blocks
CONFIGS = {
    "triphase float32": {"engine": "triphase", "dtype": "float32", "weights": "dense"},
    "triphase bfloat16": {"engine": "triphase", "dtype": "bfloat16", "weights": "dense"},
    "triphase bf16 + int4 GGUF": {"engine": "triphase", "dtype": "bfloat16", "weights": "int4"},
    "transformers float32": {"engine": "hf", "dtype": "float32"},
    "transformers bfloat16": {"engine": "hf", "dtype": "bfloat16"},
}


# ------------------------------------------------------------------------------ measurements
def memcpy_bandwidth() -> float:
    """Bytes moved per second (read + write) by a 1 GiB tensor copy, best of 5."""
    import torch

    src = torch.ones(1 << 30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    base = tokenizer.encode(" ".join(f"word{i}" for i in range(length * 2)))
    return [[(t + k) % 1000 + 100 for t in base[:length]] for k in range(count)]


def run_triphase(spec: dict, quick: bool) -> dict:
    import torch

    from triphase.workers.engine.core import Engine, EngineConfig
    from triphase.workers.engine.sampling import SamplingParams

    config = EngineConfig(dtype=spec["dtype"], weights=spec["weights"], enable_prefix_caching=False,
                          num_kv_blocks=KV_BLOCKS, max_num_batched_tokens=PREFILL_TOKENS, max_num_seqs=64)
    engine = Engine.from_path(None, config)
    tok = engine.tokenizer
    result: dict = {"weight_bytes": weight_bytes(engine), "threads": torch.get_num_threads()}

    times = []
    for i in range(2 if quick else 4):
        prompt = prompts(tok, 1, PREFILL_TOKENS)[0]
        prompt[0] = 100 + i
        start = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        times.append(time.perf_counter() - start)
    result["prefill_tps"] = PREFILL_TOKENS / statistics.median(times[1:])

    decode = {}
    for batch in BATCHES:
        decode[batch] = max(decode_rate(engine, batch, f"{batch}-{rep}") for rep in range(REPEATS))
        log(f"  {spec['dtype']}/{spec['weights']} batch {batch}: {decode[batch]:.1f} tokens/s")
    result["decode_tps"] = decode
    return result


def decode_rate(engine, batch: int, tag: str, tokens: int = DECODE_TOKENS,
                batch_prompts: list[list[int]] | None = None) -> float:
    """Aggregate tokens/s of the decode phase: all prompts (`batch_prompts`, or `batch` 16-token ones)
    are prefilled before the clock starts."""
    from triphase.workers.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    batch_prompts = batch_prompts or prompts(engine.tokenizer, batch, 16)
    reqs = [engine.add_request(f"{tag}-{i}", p, params) for i, p in enumerate(batch_prompts)]
    while any(r.num_output_tokens == 0 for r in reqs):
        engine.step()
    produced = sum(r.num_output_tokens for r in reqs)
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return (sum(r.num_output_tokens for r in reqs) - produced) / (time.perf_counter() - start)


def weight_bytes(engine) -> int:
    """Bytes of weights one batch-1 decode step reads (matrices + norms; one embedding row ignored)."""
    model = engine.model
    total = model.lm_head.nbytes_small_step
    for layer in model.layers:
        total += sum(linear.nbytes_small_step for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))
        total += 2 * layer.attn_norm.numel() * layer.attn_norm.element_size()
    return total


def run_hf(spec: dict, quick: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from triphase.common.models.files import bundled_model_path
    from triphase.workers.models.loader import load_model

    path = bundled_model_path()
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
    model.eval()
    tok = load_model(None).tokenizer
    result: dict = {"threads": torch.get_num_threads()}
    times = []
    with torch.no_grad():
        for i in range(2 if quick else 4):
            prompt = prompts(tok, 1, PREFILL_TOKENS)[0]
            prompt[0] = 100 + i
            start = time.perf_counter()
            model(torch.tensor([prompt]))
            times.append(time.perf_counter() - start)
    result["prefill_tps"] = PREFILL_TOKENS / statistics.median(times[1:])
    decode = {}
    for batch in BATCHES:
        ids = torch.tensor(prompts(tok, batch, 16))
        mask = torch.ones_like(ids)

        def gen(n: int, ids=ids, mask=mask) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - start

        gen(2)
        rates = []
        for _ in range(REPEATS):
            first = gen(1)
            rates.append(batch * (DECODE_TOKENS - 1) / (gen(DECODE_TOKENS) - first))
        decode[batch] = max(rates)
        log(f"  transformers {spec['dtype']} batch {batch}: {decode[batch]:.1f} tokens/s")
    result["decode_tps"] = decode
    return result


def peak_rss() -> int:
    """This process's high-water RSS. (ru_maxrss would also count the parent's, inherited over exec.)"""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(name: str, quick: bool) -> None:
    spec = CONFIGS[name]
    result = run_triphase(spec, quick) if spec["engine"] == "triphase" else run_hf(spec, quick)
    result["peak_rss_bytes"] = peak_rss()
    sys.stdout.write(json.dumps(result) + "\n")


# ------------------------------------------------------------------------------ report
def render(results: dict, bandwidth: float, threads: int) -> str:
    hf1 = results["transformers float32"]["decode_tps"]["1"]
    lines = [
        "## Engine: triphase vs transformers (bundled SmolLM2-135M-Instruct, Q4_1 GGUF)",
        "",
        f"One run of `python benchmarks/engine.py` ({time.strftime('%Y-%m-%d')}, {threads} threads, "
        f"this machine's 2-core CPU); each row in a fresh process. Decode: {DECODE_TOKENS} tokens per request "
        f"after 16-token prompts, aggregate tokens/s of the decode phase, best of {REPEATS} runs; triphase "
        f"preallocates {KV_BLOCKS} KV blocks of 16 tokens (in its RSS). Memory bandwidth (1 GiB memcpy, "
        f"bytes read + written): **{bandwidth / 1e9:.1f} GB/s**. Bound = bandwidth / weight bytes read per "
        "decode step.",
        "",
        "| configuration | prefill 512 tok/s | decode b=1 | b=8 | b=32 | b=64 | peak RSS | weights/step | "
        "b=1 bound | b=1 % of bound | b=1 vs tf fp32 b=1 | b=32 vs tf fp32 b=1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        d = r["decode_tps"]
        wb = r.get("weight_bytes")
        bound = bandwidth / wb if wb else None
        lines.append(
            f"| {name} | {r['prefill_tps']:.0f} | {d['1']:.1f} | {d['8']:.1f} | {d['32']:.1f} | {d['64']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | "
            + (f"{wb / 2**20:.0f} MiB | {bound:.0f} | {100 * d['1'] / bound:.0f} % | " if bound else "- | - | - | ")
            + f"{d['1'] / hf1:.2f}x | {d['32'] / hf1:.1f}x |"
        )
    lines += ["", "![decode throughput by batch size](benchmarks/engine.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        ys = [r["decode_tps"][str(b)] for b in BATCHES]
        ax.plot(BATCHES, ys, marker="o", linestyle="--" if name.startswith("transformers") else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("decode tokens/s (aggregate)")
    ax.set_title("SmolLM2-135M decode on a 2-core CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    import torch

    log("measuring memory bandwidth")
    bandwidth = memcpy_bandwidth()
    log(f"memcpy: {bandwidth / 1e9:.1f} GB/s (read + write)")
    results = {}
    for name in CONFIGS:
        log(f"{name} ...")
        cmd = [sys.executable, __file__, "--child", name] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name]["decode_tps"] = {str(k): v for k, v in results[name]["decode_tps"].items()}
    section = render(results, bandwidth, torch.get_num_threads())
    sys.stdout.write(section)
    if not args.no_write:
        plot(results, ROOT / "benchmarks" / "engine.png")
        update_section("engine", section)
        (ROOT / "benchmarks" / "engine.json").write_text(json.dumps({"bandwidth": bandwidth, "results": results},
                                                                    indent=1))
        log("wrote BENCHMARKS.md, benchmarks/engine.png, benchmarks/engine.json")


if __name__ == "__main__":
    main()
