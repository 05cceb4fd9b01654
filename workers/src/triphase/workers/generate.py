"""`triphase generate`: one completion from the engine, streamed to the terminal or as JSON.

Only `run` imports the engine (and torch), so building the CLI parser stays instant."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from triphase.workers.main import add_device_arguments

T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt text (or the user message with --chat)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", help="system message (with --chat)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    parser.add_argument("--model", help="GGUF file or Hugging Face directory (default: bundled SmolLM2-135M)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="compute and KV dtype (default bfloat16; float32 reproduces transformers exactly)")
    parser.add_argument("--weights", default="auto", choices=["auto", "dense", "int4"],
                        help="auto (default): run a GGUF file's 4-bit matrices packed when the dtype is bfloat16")
    add_device_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def progress_bar(quiet: bool):
    """A loader progress callback: tqdm on stderr, or nothing when quiet."""
    def wrap(items: Iterable[T], total: int, desc: str) -> Iterable[T]:
        from tqdm import tqdm

        return tqdm(items, total=total, desc=desc, unit="tensor", disable=quiet, file=sys.stderr, leave=False)

    return wrap


def run(args: argparse.Namespace) -> int:
    from triphase.workers.engine.core import Engine, EngineConfig
    from triphase.workers.engine.device import resolve_device
    from triphase.workers.engine.sampling import SamplingParams

    sampling = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    started = time.monotonic()
    # KV: 256 MiB on the CPU (one request needs little); on a GPU, --gpu-memory-fraction of what is free
    kv_bytes = 256 << 20 if resolve_device(args.device).type == "cpu" else None
    config = EngineConfig(dtype=args.dtype, weights=args.weights, kv_cache_bytes=kv_bytes, device=args.device,
                          gpu_memory_fraction=args.gpu_memory_fraction)
    engine = Engine.from_path(args.model, config,
                              progress=progress_bar(quiet=args.json or not sys.stderr.isatty()))
    load_s = time.monotonic() - started
    tok = engine.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt_ids = tok.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)

    request = engine.add_request("cli", prompt_ids, sampling)
    text, reason = "", None
    first_at = None
    t0 = time.monotonic()
    while reason is None:
        for out in engine.step():
            if first_at is None:
                first_at = time.monotonic()
            text += out.new_text
            if not args.json:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            if out.finished:
                reason = out.finish_reason
    total = time.monotonic() - t0
    ttft = (first_at or t0) - t0
    generated = request.output_token_ids
    decode_tps = (len(generated) - 1) / (total - ttft) if len(generated) > 1 and total > ttft else 0.0
    timings = {"load_s": round(load_s, 3), "ttft_s": round(ttft, 4), "total_s": round(total, 4),
               "decode_tokens_per_s": round(decode_tps, 1)}
    if args.json:
        result: dict[str, Any] = {
            "text": text, "token_ids": generated, "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(generated), "finish_reason": reason, "timings": timings,
            "device": str(engine.device), "dtype": args.dtype,
        }
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write("\n")
        sys.stderr.write(f"[{len(generated)} tokens, prompt {len(prompt_ids)} tokens, "
                         f"first token {ttft * 1000:.0f} ms, {decode_tps:.1f} tokens/s decode on {engine.device}, "
                         f"finish: {reason}]\n")
    return 0
