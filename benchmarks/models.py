"""Model families on the engine, against transformers in the same run, same process, same threads.

    python benchmarks/models.py [--quick] [--output PATH] [--no-report | --render]

  decode   for each family, a small random checkpoint (tests/checkpoints.py `family_config` at
           hidden 512, 4 layers, vocab 8192; MoE: Qwen3-MoE 64 experts top-4, Mixtral 8 top-2), and
           for SmolLM2 (the bundled GGUF): decode tokens/s at batch 1 and 32 in float32, triphase
           (engine steps) vs transformers (`generate`), best of REPEATS
  experts  one Qwen3-MoE-shaped sparse layer (64 experts, top-4, hidden 512, expert width 256) on 32
           tokens whose routing is forced to touch 4 .. 64 distinct experts: its time against the
           experts touched (bandwidth: every touched expert's weights are read whatever its tokens);
           and the whole checkpoint's decode step at batch 1 .. 64 with its natural routing
  window   KV blocks one request holds (a 1024-token prompt and 256 tokens, window 256, blocks of
           16) on a model whose every layer slides, against the blocks the same tokens need without
           dropping (the decode worker's share; a NIXL hand-off moves the live tail only)

Writes the results (JSON), the "models" section of BENCHMARKS.md and benchmarks/models.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch
from engine import decode_rate
from report import ROOT, figure, log, save_figure, update_section

# The repository root for tests.checkpoints, and benchmarks/ off the path: transformers imports a
# `kernels` package, which benchmarks/kernels.py would shadow.
_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if pathlib.Path(p or ".").resolve() != _HERE)]

from tests.checkpoints import FAMILIES, build_checkpoint  # noqa: E402
from triphase.workers.engine.core import Engine, EngineConfig  # noqa: E402
from triphase.workers.engine.sampling import SamplingParams  # noqa: E402
from triphase.workers.models.loader import load_model  # noqa: E402
from triphase.workers.models.moe import ExpertLoad, SparseMoe  # noqa: E402

SIZES = dict(vocab=8192, hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4, head_dim=64,
             moe_intermediate=256, window=4096)
MOE_SIZES = {"qwen3_moe": dict(experts=64, top_k=4), "mixtral": dict(experts=8, top_k=2)}
BATCHES = (1, 32)
PROMPT = 16
DECODE = 32
REPEATS = 3


def prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, PROMPT), generator=gen).tolist()


def transformers_rate(model, batch: int, vocab: int) -> float:  # type: ignore[no-untyped-def]
    ids = torch.tensor(prompts(batch, vocab, 7))
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    gen(2)
    return max(batch * (DECODE - 1) / (gen(DECODE) - gen(1)) for _ in range(REPEATS))


def decode_rates(engine: Engine, reference, vocab: int) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    for batch in BATCHES:
        ours = max(decode_rate(engine, batch, f"b{batch}-{rep}", DECODE, prompts(batch, vocab, rep))
                   for rep in range(REPEATS))
        theirs = transformers_rate(reference, batch, vocab)
        out[str(batch)] = {"triphase": ours, "transformers": theirs}
        log(f"    batch {batch}: triphase {ours:.1f} tok/s, transformers {theirs:.1f} tok/s")
    return out


def engine_config(**extra) -> EngineConfig:  # type: ignore[no-untyped-def]
    return EngineConfig(dtype="float32", weights="dense", enable_prefix_caching=False, num_kv_blocks=256,
                        block_size=16, max_num_batched_tokens=512, max_num_seqs=64, **extra)


def bench_families(folder: pathlib.Path, families: list[str]) -> dict:
    results = {}
    for kind in families:
        log(f"  {kind}")
        path = folder / kind
        reference = build_checkpoint(kind, path, **SIZES, **MOE_SIZES.get(kind, {}))
        engine = Engine(load_model(str(path)), engine_config())
        results[kind] = decode_rates(engine, reference, SIZES["vocab"])
        del engine, reference
    log("  smollm2 (bundled GGUF)")
    from transformers import AutoModelForCausalLM

    from triphase.common.models.files import bundled_model_path

    bundled = pathlib.Path(bundled_model_path())
    reference = AutoModelForCausalLM.from_pretrained(bundled.parent, gguf_file=bundled.name, dtype=torch.float32).eval()
    engine = Engine(load_model(None), engine_config())
    results["smollm2"] = decode_rates(engine, reference, 49152)
    return results


def bench_experts(folder: pathlib.Path, quick: bool) -> dict:
    """The sparse layer alone with forced routing, then whole decode steps with natural routing."""
    experts, k, hidden, width, tokens = 64, 4, 512, 256, 32
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(experts, 2 * width, hidden, generator=gen) * 0.05
    down = torch.randn(experts, hidden, width, generator=gen) * 0.05
    # Token t of group g = t mod m carries a one-hot hidden state on dimension g, and experts
    # g*k .. g*k+k-1 are the only ones whose router row is large there: m groups touch m*k experts.
    router = torch.zeros(experts, hidden)
    for e in range(experts):
        router[e, e // k] = 10.0 + e % k
    from triphase.workers.models.config import MoeConfig

    layer = SparseMoe(MoeConfig(experts, k, width, True, (0,)), router, gate_up, down, torch.nn.functional.silu,
                      ExpertLoad())
    forced = []
    for groups in (1, 2, 4, 8, 16):
        x = torch.zeros(tokens, hidden)
        x[torch.arange(tokens), torch.arange(tokens) % groups] = 1.0
        x += torch.randn(tokens, hidden, generator=gen) * 0.01
        before = layer.load.active_experts
        layer(x)
        touched = layer.load.active_experts - before
        best = float("inf")
        for _ in range(5 if quick else 20):
            start = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - start)
        forced.append({"experts": touched, "ms": best * 1e3})
        log(f"    {tokens} tokens over {touched} experts: {best * 1e3:.2f} ms")

    path = folder / "qwen3_moe"
    if not path.exists():
        build_checkpoint("qwen3_moe", path, **SIZES, **MOE_SIZES["qwen3_moe"])
    engine = Engine(load_model(str(path)), engine_config())
    assert engine.model is not None and engine.model_config.moe is not None
    load, sparse_layers = engine.model.expert_load, len(engine.model_config.moe.layers)
    natural = []
    for batch in (1, 4, 16, 64):
        params = SamplingParams(max_tokens=DECODE, temperature=0, ignore_eos=True)
        reqs = [engine.add_request(f"n{batch}-{i}", p, params)
                for i, p in enumerate(prompts(batch, SIZES["vocab"], batch))]
        while any(r.num_output_tokens == 0 for r in reqs):
            engine.step()
        steps, active, start = 0, load.active_experts, time.perf_counter()
        while engine.has_work:
            engine.step()
            steps += 1
        seconds = time.perf_counter() - start
        per_layer = (load.active_experts - active) / (steps * sparse_layers)
        natural.append({"batch": batch, "experts": per_layer, "step_ms": seconds / steps * 1e3})
        log(f"    decode batch {batch}: {per_layer:.1f} experts per layer, {seconds / steps * 1e3:.1f} ms a step")
    return {"forced": forced, "natural": natural, "tokens": tokens, "experts": experts, "top_k": k}


def bench_window(folder: pathlib.Path) -> dict:
    path = folder / "mixtral-window"
    build_checkpoint("mixtral", path, vocab=1024, window=256)
    engine = Engine(load_model(str(path)), EngineConfig(dtype="float32", weights="dense", num_kv_blocks=256,
                                                        block_size=16, max_num_batched_tokens=256))
    prompt = torch.randint(3, 1024, (1024,), generator=torch.Generator().manual_seed(1)).tolist()
    request = engine.add_request("w", prompt, SamplingParams(max_tokens=256, temperature=0, ignore_eos=True))
    null, peak = engine.kv.null_block, 0
    while engine.has_work:
        engine.step()
        held = [i for i in engine.kv.block_ids("w") if null is None or i != null.block_id]
        peak = max(peak, len(held))
    total = len(prompt) + request.num_output_tokens
    without = -(-total // 16)
    log(f"    {total} tokens, window 256: at most {peak} blocks held, {without} without dropping")
    return {"tokens": total, "window": 256, "block_size": 16, "peak_blocks": peak, "blocks_without": without}


def render(results: dict) -> str:
    rows = []
    for kind, rates in results["decode"].items():
        cells = []
        for batch in BATCHES:
            r = rates[str(batch)]
            cells += [f"{r['triphase']:.1f}", f"{r['transformers']:.1f}", f"{r['triphase'] / r['transformers']:.2f}x"]
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    forced = " · ".join(f"{f['experts']}: {f['ms']:.2f} ms" for f in results["experts"]["forced"])
    natural = " · ".join(f"b={n['batch']}: {n['experts']:.1f} experts, {n['step_ms']:.1f} ms"
                         for n in results["experts"]["natural"])
    w = results["window"]
    return f"""## Models: the families against transformers

`python benchmarks/models.py` ({results['date']}, {results['threads']} threads, this machine's 2-core CPU,
torch {results['torch']}). Each family is a random checkpoint of its real architecture at hidden 512,
4 layers, vocab 8192 (Qwen3-MoE: 64 experts top-4 of width 256; Mixtral: 8 experts top-2), float32 on
both sides, same process; SmolLM2 is the bundled GGUF (135M) dequantized to float32. Decode tokens/s
after 16-token prompts, {DECODE} tokens, best of {REPEATS}: triphase engine steps (continuous batching,
paged KV) vs transformers `generate` (its own KV cache, no paging).

| model | b=1 triphase | b=1 transformers | ratio | b=32 triphase | b=32 transformers | ratio |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

**MoE: step time against the experts touched.** One sparse layer (64 experts, top-4, hidden 512) on
{results['experts']['tokens']} tokens, routing forced to touch a given number of distinct experts
(experts: time): {forced}. The same tokens cost more the more experts they spread over: each touched
expert's weights are read once whatever its share of tokens, so at decode batch sizes an expert layer
is bound by the bytes of the experts touched, not by the tokens. Whole decode steps of the Qwen3-MoE
checkpoint with its natural routing (distinct experts per sparse layer, step time): {natural}. This is
what `triphase_moe_routed_tokens_total / triphase_moe_active_experts_total` shows a running worker, and
why a MoE model's profile (`triphase profile`) fits a term for the expected experts a batch of b
touches, E(1 - (1 - k/E)^b), beside the per-sequence one: the step time is concave in the batch.
At batch 32 the engine matches transformers on the MoE checkpoints (0.98-1.00x): both loop over the
experts touched, and that loop's matmuls are the step.

**Sliding window, KV held.** A model whose every layer slides (window {w['window']}, blocks of
{w['block_size']}): one request of {w['tokens']} tokens holds at most {w['peak_blocks']} blocks, against
{w['blocks_without']} without dropping the blocks out of the window ({w['peak_blocks'] / w['blocks_without']:.2f}x);
a NIXL hand-off of a prompt moves only its live tail. Gemma 3's interleaved global layers keep every block.

![decode rates and the expert sweep](benchmarks/models.png)
"""


def plot(results: dict, path: pathlib.Path) -> None:
    fig, axes = figure(2, (12, 4.2))
    kinds = list(results["decode"])
    for offset, batch in enumerate(BATCHES):
        ratios = [results["decode"][k][str(batch)]["triphase"] / results["decode"][k][str(batch)]["transformers"]
                  for k in kinds]
        axes[0].bar([i + offset * 0.4 for i in range(len(kinds))], ratios, width=0.4, label=f"batch {batch}")
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_xticks([i + 0.2 for i in range(len(kinds))], kinds, rotation=30, fontsize=8)
    axes[0].set_ylabel("decode tokens/s, triphase / transformers")
    forced = results["experts"]["forced"]
    axes[1].plot([f["experts"] for f in forced], [f["ms"] for f in forced], marker="o",
                 label=f"one sparse layer, {results['experts']['tokens']} tokens")
    axes[1].set_xlabel("distinct experts touched")
    axes[1].set_ylabel("ms")
    save_figure(fig, axes, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two families and fewer repeats (a smoke run)")
    parser.add_argument("--output", type=pathlib.Path, default=ROOT / "benchmarks" / "models.json")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md and the plot")
    parser.add_argument("--render", action="store_true", help="only rewrite the report from --output's results")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.output.read_text())
        plot(results, ROOT / "benchmarks" / "models.png")
        update_section("models", render(results))
        return
    global REPEATS
    if args.quick:
        REPEATS = 1
    families = ["qwen3", "qwen3_moe"] if args.quick else FAMILIES
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        log("decode rates")
        decode = bench_families(folder, families)
        log("experts")
        experts = bench_experts(folder, args.quick)
        log("sliding window")
        window = bench_window(folder)
    results = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "decode": decode, "experts": experts, "window": window}
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_report:
        plot(results, ROOT / "benchmarks" / "models.png")
        update_section("models", render(results))


if __name__ == "__main__":
    main()
