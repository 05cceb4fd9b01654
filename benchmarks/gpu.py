"""The GPU check: every claim issue "workers compute on the GPU" makes, measured in one command.

    make gpu-check                    # or: python benchmarks/gpu.py [--device cuda:0] [--output PATH]
    python benchmarks/gpu.py --device cpu --quick --output /tmp/g.json --no-report   # the script's own test

Stages, each timed and each allowed to fail on its own (its traceback is recorded and the rest still
run); the results file is rewritten after every stage, so a run cut short keeps what it measured:

  env        device, torch, CUDA, the NIXL build, GPU memory
  exact      greedy tokens of triphase float32 == transformers float32, on the device, a few prompts
  decode     decode tokens/s at batch 1, 8, 32, 64: triphase bfloat16 vs transformers bfloat16; the
             device copy bandwidth and the batch-1 share of its bound (bandwidth / weight bytes a step reads)
  big        the same batch-1 share for a 1B-parameter Llama shape with random weights (the bundled
             135M model's steps are launch-bound, not bandwidth-bound: see BENCHMARKS.md)
  ttft       prefill time of a 2,048-token prompt (the worker's 512-token chunks, and one 2,048 chunk)
  handoff    a 2,048-token prompt's KV: NIXL READ between two processes' device KV tensors vs a copy
             of the same bytes on the device (GB/s)
  stack      `triphase up` with 1 prefill + 1 decode worker on this device: router -> prefill -> NIXL
             (VRAM on a GPU) -> decode, the nixl byte counter, outputs == a single-process engine
  mixed      a prefill worker on this device and a decode worker on the CPU: the hand-off takes the
             gRPC stream (staged through host memory) and the outputs are still identical

Writes the results (JSON) to --output and, unless --no-report, the "gpu" section of BENCHMARKS.md and
benchmarks/gpu.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import re
import sys
import tempfile
import time
import traceback
import urllib.request

from engine import decode_rate, weight_bytes
from engine import prompts as prompt_ids
from report import ROOT, log, update_section
from stack import router, stop_all, wait_until, worker


def _import_around_benchmarks(name: str) -> None:
    """Import the installed package `name` before benchmarks/NAME.py can shadow it (transformers imports
    `kernels`; this script's folder is first on sys.path, also in its spawned children)."""
    here = pathlib.Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]
    try:
        __import__(name)
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_around_benchmarks("kernels")

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Explain why the sky is blue in one sentence."]
BATCHES = (1, 8, 32, 64)
DECODE_TOKENS = 48
LONG_PROMPT = 2048
BLOCK = 16
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
           "rms_norm_eps": 1e-5}
MODEL: str | None = None  # --model / --random-model: the model every stage runs (None: the bundled GGUF)
BIG = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
       "num_key_value_heads": 8, "vocab_size": 49152, "max_position_embeddings": 4096}


# ------------------------------------------------------------------------------ helpers
def sync(device) -> None:  # type: ignore[no-untyped-def]
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Best of `repeats` synchronised calls after one warm-up."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def engine(device: str, dtype: str, **kwargs):  # type: ignore[no-untyped-def]
    from triphase.workers.engine.core import Engine, EngineConfig

    path = kwargs.pop("path", MODEL)
    config = EngineConfig(dtype=dtype, weights="dense", device=device, enable_prefix_caching=False,
                          kv_cache_bytes=kwargs.pop("kv_cache_bytes", 1 << 30), **kwargs)
    return Engine.from_path(path, config)


def hf_model(device, dtype: str, path: str | None = None):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    from triphase.common.models.files import bundled_model_path

    path = path or MODEL
    if path is None:
        gguf = bundled_model_path()
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                     dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def free(*objects) -> None:  # type: ignore[no-untyped-def]
    import gc

    import torch

    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_decode_rate(model, tokenizer, batch: int, tokens: int, device) -> float:  # type: ignore[no-untyped-def]
    import torch

    ids = torch.tensor(prompt_ids(tokenizer, batch, 16), device=device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    gen(2)
    return max(batch * (tokens - 1) / (gen(tokens) - gen(1)) for _ in range(2))


def copy_bandwidth(device, nbytes: int) -> float:  # type: ignore[no-untyped-def]
    """Bytes read + written per second by one large copy on the device, best of 10."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 10)


# ------------------------------------------------------------------------------ stages
def stage_env(args, device) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from triphase.workers.kv.nixl import backend_module

    try:
        nixl = backend_module()
    except ImportError:  # a run of the stages that need no NIXL, where it is not installed
        nixl = "not installed"
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "nixl": nixl,
            "python": sys.version.split()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free_b, total_b = torch.cuda.mem_get_info(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=total_b / 2**30,
                    free_gib=free_b / 2**30, driver=torch.cuda.driver_version() if hasattr(torch.cuda,
                                                                                         "driver_version") else None)
    return info


def stage_exact(args, device) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from triphase.workers.engine.sampling import SamplingParams

    tokens = 8 if args.quick else 24
    eng = engine(str(device), "float32")
    model = hf_model(device, "float32")
    tok = eng.tokenizer
    rows = []
    for text in PROMPTS[: 2 if args.quick else 4]:
        ids = tok.encode_chat([{"role": "user", "content": text}])
        ours = eng.generate([ids], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))[0].token_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
        theirs = out[0, len(ids):].tolist()
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
        rows.append({"prompt": text, "identical": ours == theirs, "first_difference": first_diff,
                     "tokens": len(ours)})
    free(eng, model)
    return {"rows": rows, "identical": all(r["identical"] for r in rows)}


def stage_decode(args, device) -> dict:  # type: ignore[no-untyped-def]
    batches = (1, 4) if args.quick else BATCHES
    tokens = 8 if args.quick else DECODE_TOKENS
    eng = engine(str(device), "bfloat16", max_num_seqs=64, max_num_batched_tokens=1024)
    ours = {b: max(decode_rate(eng, b, f"d{b}-{r}", tokens) for r in range(2)) for b in batches}
    for b, rate in ours.items():
        log(f"  triphase bfloat16 b={b}: {rate:.0f} tokens/s")
    wbytes = weight_bytes(eng)
    tok = eng.tokenizer
    free(eng)
    model = hf_model(device, "bfloat16")
    theirs = {b: hf_decode_rate(model, tok, b, tokens, device) for b in batches}
    for b, rate in theirs.items():
        log(f"  transformers bfloat16 b={b}: {rate:.0f} tokens/s")
    free(model)
    bandwidth = copy_bandwidth(device, (64 if args.quick else 1024) << 20)
    bound = bandwidth / wbytes
    return {"triphase": ours, "transformers": theirs, "weight_bytes": wbytes, "copy_bandwidth": bandwidth,
            "bound_b1": bound, "share_of_bound_b1": ours[1] / bound,
            "ratio": {b: ours[b] / theirs[b] for b in batches}}


def stage_big(args, device) -> dict:  # type: ignore[no-untyped-def]
    """Batch-1 decode of a 1B-parameter Llama shape (random weights, the bundled tokenizer)."""
    import shutil


    shape = dict(BIG, num_hidden_layers=2) if args.quick else BIG
    folder = pathlib.Path(tempfile.mkdtemp(prefix="triphase-big-"))
    try:
        random_model(folder, shape)
        eng = engine(str(device), "bfloat16", path=str(folder), max_num_seqs=8)
        rate = max(decode_rate(eng, 1, f"big-{r}", 12 if args.quick else DECODE_TOKENS) for r in range(2))
        wbytes = weight_bytes(eng)
        free(eng)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    bandwidth = copy_bandwidth(device, (64 if args.quick else 1024) << 20)
    return {"shape": shape, "tokens_per_s_b1": rate, "weight_bytes": wbytes, "copy_bandwidth": bandwidth,
            "share_of_bound_b1": rate * wbytes / bandwidth}


def stage_ttft(args, device) -> dict:  # type: ignore[no-untyped-def]
    from triphase.workers.engine.sampling import SamplingParams

    length = 256 if args.quick else LONG_PROMPT
    sampling = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    result = {"prompt_tokens": length}
    for chunk in (512, length):
        eng = engine(str(device), "bfloat16", max_num_batched_tokens=chunk)
        prompt = [(i * 7919) % 40000 + 100 for i in range(length)]
        eng.generate([prompt[:64]], sampling)  # warm-up
        best = float("inf")
        for attempt in range(3):
            prompt[0] = 100 + attempt
            start = time.perf_counter()
            eng.generate([prompt], sampling)
            best = min(best, time.perf_counter() - start)
        result[f"chunk_{chunk}"] = best
        free(eng)
    return result


def _handoff_source(conn, device: str, layout_args: tuple) -> None:  # type: ignore[type-arg]
    import torch

    from triphase.workers.engine.kv_layout import KvLayout
    from triphase.workers.engine.model_runner import allocate_kv
    from triphase.workers.kv.nixl import NixlConnector

    layout = KvLayout(*layout_args)
    kv = allocate_kv(layout.shape, torch.bfloat16, torch.device(device))
    kv.copy_(torch.randn(layout.shape, device=device).to(torch.bfloat16))
    nixl = NixlConnector("gpu-check-source", kv, layout)
    checksum = float(kv.float().sum())
    conn.send((nixl.metadata, nixl.base_address, nixl.memory, nixl.device_id, checksum))
    conn.recv()  # until the reader is done


def stage_handoff(args, device) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from triphase.workers.engine.kv_layout import KvLayout
    from triphase.workers.engine.model_runner import allocate_kv
    from triphase.workers.kv.nixl import NixlConnector

    tokens = 256 if args.quick else LONG_PROMPT
    blocks = tokens // BLOCK
    layout_args = (blocks, 30, BLOCK, 3, 64, "bfloat16")  # SmolLM2-135M's KV
    layout = KvLayout(*layout_args)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    source = ctx.Process(target=_handoff_source, args=(child, str(device), layout_args), daemon=True)
    source.start()
    try:
        wait_until(lambda: parent.poll() or not source.is_alive(), 180, "the KV source process")
        if not parent.poll():
            raise RuntimeError(f"the KV source process exited with {source.exitcode}")
        metadata, base, memory, device_id, checksum = parent.recv()
        kv = allocate_kv(layout.shape, torch.bfloat16, device)
        nixl = NixlConnector("gpu-check-reader", kv, layout)
        ids = list(range(blocks))

        def read() -> None:
            nixl.read(metadata, base, ids, ids, remote_memory=memory, remote_device=device_id)

        nixl_s = timed(read, device, 5)
        same = abs(float(kv.float().sum()) - checksum) <= 1e-3 * max(1.0, abs(checksum))
        other = torch.empty_like(kv)
        copy_s = timed(lambda: other.copy_(kv), device, 5)
    finally:
        parent.send("done")
        source.join(timeout=60)
    nbytes = layout.total_bytes
    return {"tokens": tokens, "bytes": nbytes, "memory": memory, "nixl_gbps": nbytes / nixl_s / 1e9,
            "copy_gbps": nbytes / copy_s / 1e9, "share_of_copy": copy_s / nixl_s, "bytes_identical": same}


def _complete(url: str, prompt: str, tokens: int) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        model = json.loads(response.read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return str(json.loads(response.read())["choices"][0]["text"])


def _single_process(device: str, prompts: list[str], tokens: int) -> list[str]:
    from triphase.workers.engine.sampling import SamplingParams

    eng = engine(device, "float32")
    texts = [c.text for c in eng.generate([eng.tokenizer.encode(p) for p in prompts],
                                          SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))]
    free(eng)
    return texts


def _nixl_bytes(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    found = re.search(r'triphase_kv_transfer_bytes_total\{backend="nixl",model="[^"]+"\} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def stage_stack(args, device) -> dict:  # type: ignore[no-untyped-def]
    from triphase.local.processes import triphase_up

    tokens = 16
    prompts = PROMPTS[:2]
    expected = _single_process(str(device), prompts, tokens)
    up = ["--prefill", "1", "--decode", "1", "--dtype", "float32", "--device", str(device), "--no-mtls",
          *(["--model", MODEL] if MODEL else [])]
    with triphase_up(up, timeout=300) as (proc, url):
        before = _nixl_bytes(url)
        texts = [_complete(url, p, tokens) for p in prompts]
        moved = _nixl_bytes(url) - before
        decode_log = (proc.logs / "decode-0.log").read_text()  # type: ignore[attr-defined]
    kv_memory = re.search(r"KV transfer NIXL from (\w+)", decode_log)
    return {"identical": texts == expected, "nixl_bytes": moved, "decode_kv_memory": kv_memory and kv_memory.group(1),
            "texts": texts, "expected": expected}


def stage_mixed(args, device) -> dict:  # type: ignore[no-untyped-def]
    tokens = 16
    prompts = PROMPTS[:2]
    expected = _single_process("cpu", prompts, tokens)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="triphase-mixed-"))
    common = ["--dtype", "float32", "--kv-cache-mib", "64", "--metrics-port", "-1",
              *(["--model", MODEL] if MODEL else [])]
    procs = []
    try:
        prefill, p_ep = worker(tmp, "prefill", ["--role", "prefill", "--device", str(device), *common], timeout=300)
        procs.append(prefill)
        decode, d_ep = worker(tmp, "decode", ["--role", "decode", "--device", "cpu", *common], timeout=300)
        procs.append(decode)
        rproc, url = router(tmp, [p_ep, d_ep])
        procs.append(rproc)
        texts = [_complete(url, p, tokens) for p in prompts]
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
    finally:
        stop_all(procs)
    moved = {backend: float(found.group(1)) if (found := re.search(
        rf'triphase_kv_transfer_bytes_total\{{backend="{backend}",model="[^"]+"\}} (\S+)', metrics)) else 0.0
        for backend in ("nixl", "grpc")}
    return {"identical": texts == expected, "bytes": moved, "texts": texts, "expected": expected}


def export_tokenizer(folder: pathlib.Path) -> None:
    """The bundled model's tokenizer as tokenizer.json + tokenizer_config.json (a few MiB: what a machine
    that cannot take the 98 MB GGUF needs for --random-model)."""
    from triphase.common.models.files import load_tokenizer

    tok, _ = load_tokenizer(None)
    folder.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(folder / "tokenizer.json"))
    specials = tok.special_tokens
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "add_bos_token": tok.add_bos_token,
        "bos_token": specials.get("bos_token") or None, "eos_token": specials.get("eos_token") or None}))


def random_model(folder: pathlib.Path, shape: dict, tokenizer: pathlib.Path | None = None) -> None:  # type: ignore[type-arg]
    """A Llama-family Hugging Face directory of `shape` with random weights (seed 0) and a tokenizer (from
    `tokenizer`, a folder export_tokenizer wrote, else the bundled model's)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{"rope_theta": 10000.0, **shape}, tie_word_embeddings=True, eos_token_id=2,
                         bos_token_id=1)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    if tokenizer is None:
        export_tokenizer(folder)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, folder / name)


STAGES = {"env": stage_env, "exact": stage_exact, "decode": stage_decode, "big": stage_big, "ttft": stage_ttft,
          "handoff": stage_handoff, "stack": stage_stack, "mixed": stage_mixed}


# ------------------------------------------------------------------------------ report
def render(results: dict) -> str:  # type: ignore[type-arg]
    env = results.get("env", {})
    lines = ["## GPU", "", f"`python benchmarks/gpu.py` ({results['date']}): {env.get('name', 'CPU')} "
             f"({env.get('device')}), torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('nixl')}; model: "
             f"{results.get('model', 'the bundled SmolLM2-135M-Instruct')}; {results['seconds']:.0f} s in all.", ""]
    for name in STAGES:
        r = results.get(name)
        if isinstance(r, dict) and "error" in r:
            lines.append(f"- **{name}: failed** — `{r['error'].strip().splitlines()[-1][:200]}`")
    exact = results.get("exact", {})
    if "rows" in exact:
        lines.append(f"- float32 greedy tokens identical to transformers on the device: **{exact['identical']}** "
                     f"({sum(r['identical'] for r in exact['rows'])}/{len(exact['rows'])} prompts)")
    d = results.get("decode", {})
    if "triphase" in d:
        lines += ["", "| decode tokens/s (bfloat16) | " + " | ".join(f"b={b}" for b in d["triphase"]) + " |",
                  "| --- |" + " ---: |" * len(d["triphase"])]
        for who in ("triphase", "transformers"):
            lines.append(f"| {who} | " + " | ".join(f"{v:.0f}" for v in d[who].values()) + " |")
        lines.append("| ratio | " + " | ".join(f"{v:.2f}x" for v in d["ratio"].values()) + " |")
        lines += ["", f"- device copy bandwidth (read + write) **{d['copy_bandwidth'] / 1e9:.0f} GB/s**; weights "
                  f"per step {d['weight_bytes'] / 2**20:.0f} MiB; batch-1 bound {d['bound_b1']:.0f} tokens/s; "
                  f"batch 1 reaches **{100 * d['share_of_bound_b1']:.1f} %** of it (target >= 60 %)"
                  + ("".join(f"; batch 32 **{v:.2f}x** transformers (target >= 1.5x)"
                             for b, v in d["ratio"].items() if str(b) == "32"))]
    b = results.get("big", {})
    if "share_of_bound_b1" in b:
        lines.append(f"- 1B-parameter Llama shape (random weights): batch 1 {b['tokens_per_s_b1']:.0f} tokens/s, "
                     f"**{100 * b['share_of_bound_b1']:.1f} %** of its bound")
    t = results.get("ttft", {})
    if "prompt_tokens" in t:
        lines.append(f"- prefill of a {t['prompt_tokens']}-token prompt: "
                     + ", ".join(f"{v * 1e3:.1f} ms ({k.removeprefix('chunk_')}-token chunks)"
                                 for k, v in t.items() if k.startswith("chunk_")))
    h = results.get("handoff", {})
    if "nixl_gbps" in h:
        lines.append(f"- KV hand-off of {h['tokens']} tokens ({h['bytes'] / 2**20:.1f} MiB, {h['memory']}): NIXL "
                     f"{h['nixl_gbps']:.1f} GB/s vs device copy {h['copy_gbps']:.1f} GB/s = "
                     f"**{100 * h['share_of_copy']:.0f} %** (target >= 50 %); bytes identical: {h['bytes_identical']}")
    s = results.get("stack", {})
    if "identical" in s:
        lines.append(f"- `triphase up` 1 prefill + 1 decode on the device: outputs identical to one process: "
                     f"**{s['identical']}**, NIXL bytes {s['nixl_bytes']:.0f}, decode KV in {s['decode_kv_memory']}")
    m = results.get("mixed", {})
    if "identical" in m:
        lines.append(f"- prefill on the device, decode on the CPU: identical **{m['identical']}**; KV bytes by "
                     f"backend: {m['bytes']}")
    lines += ["", "![decode tokens/s by batch](benchmarks/gpu.png)"] if "triphase" in d else []
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:  # type: ignore[type-arg]
    from report import figure

    d = results["decode"]
    fig, (ax,) = figure(1, (6, 4))
    for who in ("triphase", "transformers"):
        ax.plot([int(b) for b in d[who]], list(d[who].values()), marker="o", label=f"{who} bfloat16")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequences decoding together")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Decode on {results['env'].get('name', results['env']['device'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict) -> None:  # type: ignore[type-arg]
    section = render(results)
    sys.stdout.write(section)
    if "triphase" in results.get("decode", {}):
        plot(results, ROOT / "benchmarks" / "gpu.png")
    update_section("gpu", section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="where to run (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a check of the script itself")
    parser.add_argument("--output", type=pathlib.Path, default=ROOT / "benchmarks" / "gpu.json")
    parser.add_argument("--only", help="comma-separated stages (default: all)")
    parser.add_argument("--no-report", action="store_true", help="leave BENCHMARKS.md and the PNG alone")
    parser.add_argument("--model", help="the model every stage runs (default: the bundled GGUF)")
    parser.add_argument("--random-model", type=pathlib.Path, metavar="TOKENIZER_DIR",
                        help="run SmolLM2-135M's shape with random weights (made here) and the tokenizer that "
                             "--export-tokenizer wrote: for a machine that cannot take the 98 MB GGUF")
    parser.add_argument("--export-tokenizer", type=pathlib.Path, metavar="DIR",
                        help="write the bundled tokenizer to DIR and exit")
    parser.add_argument("--render", type=pathlib.Path, nargs="+", metavar="JSON",
                        help="write BENCHMARKS.md's section and the PNG from results files of earlier runs (the "
                             "stages of split runs, see scripts/gpu_payload.sh) and exit")
    args = parser.parse_args()
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        return 0
    if args.render:
        merged: dict = {}  # type: ignore[type-arg]
        for path in args.render:
            part = json.loads(path.read_text())
            merged |= {k: v for k, v in part.items() if k != "seconds"}
            merged["seconds"] = merged.get("seconds_total", 0) + part.get("seconds", 0)
            merged["seconds_total"] = merged["seconds"]
        report(merged)
        return 0
    global MODEL
    MODEL = args.model
    if args.random_model:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="triphase-smollm2-random-"))
        random_model(folder, SMOLLM2, args.random_model)
        MODEL = str(folder)

    from triphase.workers.engine.device import resolve_device

    device = resolve_device(args.device)
    chosen = args.only.split(",") if args.only else list(STAGES)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
                     "model": "SmolLM2-135M's shape with random weights, its tokenizer" if args.random_model
                     else args.model or "the bundled SmolLM2-135M-Instruct (Q4_1 GGUF)"}
    started = time.monotonic()
    for name in chosen:
        log(f"{name} ...")
        t0 = time.monotonic()
        try:
            results[name] = STAGES[name](args, device)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            log(f"{name} failed:\n{results[name]['error']}")
        results[name]["seconds"] = time.monotonic() - t0
        results["seconds"] = time.monotonic() - started
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1, default=str))
        log(f"{name} done in {results[name]['seconds']:.0f} s")
    if args.no_report:
        sys.stdout.write(render(results))
    else:
        report(results)
    failed = [n for n in chosen if "error" in results[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
