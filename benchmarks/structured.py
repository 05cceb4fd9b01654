"""Structured output and n choices on the engine: what a grammar costs per token, what compiling one
costs, and what n = 8 saves against 8 separate requests. All in one process, the same run, the bundled
model in the workers' default dtype (bfloat16), on this machine's cores.

    python benchmarks/structured.py [--output PATH] [--no-report]

  mask      the grammar engines' per-step mask cost for a 20-field schema, following a valid output
            token by token, at batch 1 and 32: llguidance (the dependency) and, when it is installed
            (`pip install xgrammar==0.2.8`), xgrammar — the measurement behind common/grammar.py's choice
  decode    per-token cost of constrained vs unconstrained decode at batch 1 and 32 (target <= 1.15x):
            the same prompt, the same number of tokens (a schema long enough never to end first)
  compile   compiling a 20-field schema on a worker (router validation + matcher), then the same schema
            again (the cache: a copy of the compiled matcher)
  choices   n = 8 against 8 separate requests with the same prompt: KV blocks held at the peak and wall
            time (target: <= 0.5x the blocks)

Writes the results (JSON), the "structured" section of BENCHMARKS.md and benchmarks/structured.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
from report import ROOT, figure, log, save_figure, update_section

from triphase.common import grammar
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.grammar import Grammars
from triphase.workers.engine.sampling import SamplingParams

FIELDS = 20
SCHEMA = {"type": "object", "additionalProperties": False, "required": [f"field_{i}" for i in range(FIELDS)],
          "properties": {f"field_{i}": [{"type": "integer"}, {"type": "string", "maxLength": 20},
                                        {"type": "boolean"}][i % 3] for i in range(FIELDS)}}
# A schema no decode of DECODE_TOKENS tokens can complete: constrained and free runs produce as many tokens.
LONG = {"type": "array", "minItems": 200, "items": {"type": "string", "minLength": 10, "maxLength": 40}}
DECODE_TOKENS = 48
BATCHES = (1, 32)


def instance_tokens(tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    value = {f"field_{i}": [i * 7, f"value {i}", bool(i % 2)][i % 3] for i in range(FIELDS)}
    return tokenizer.encode(json.dumps(value, separators=(",", ":")), add_special_tokens=False)


def mask_costs(engine: Engine) -> dict[str, dict[int, float]]:
    """ms per step to compute (and apply) the masks of `batch` matchers following a valid output."""
    import llguidance
    import llguidance.torch as llt

    vocab = engine.model_config.vocab_size
    ids = instance_tokens(engine.tokenizer)
    g = grammar.json_schema(SCHEMA)
    lltok = engine.grammars.lltokenizer
    executor = llguidance.LLExecutor()
    out: dict[str, dict[int, float]] = {"llguidance": {}}
    for batch in BATCHES:
        matchers = [llguidance.LLMatcher(lltok, g) for _ in range(batch)]
        mask = llt.allocate_token_bitmask(batch, vocab)
        start = time.perf_counter()
        for token in ids:
            llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
            for m in matchers:
                m.consume_token(token)
        out["llguidance"][batch] = 1e3 * (time.perf_counter() - start) / len(ids)
    try:
        import transformers
        import xgrammar as xgr
    except ImportError:
        log("xgrammar is not installed: measuring llguidance only")
        return out
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=engine.tokenizer.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=list(engine.tokenizer.eos_token_ids))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                             separators=(",", ":"))
    out["xgrammar"] = {}
    for batch in BATCHES:
        xmatchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        xmask = xgr.allocate_token_bitmask(batch, vocab)
        start = time.perf_counter()
        for token in ids:
            for i, xm in enumerate(xmatchers):
                xm.fill_next_token_bitmask(xmask, i)
            for xm in xmatchers:
                xm.accept_token(token)
        out["xgrammar"][batch] = 1e3 * (time.perf_counter() - start) / len(ids)
    return out


def decode_step_ms(engine: Engine, prompt: list[int], batch: int, constrained: bool) -> float:
    """Mean time of a decode step (every request past its prompt), `batch` requests together."""
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True,
                            grammar=grammar.json_schema(LONG) if constrained else "")
    for i in range(batch):
        engine.add_request(f"{'c' if constrained else 'f'}{batch}-{i}", prompt, params)
    steps, elapsed = 0, 0.0
    while engine.has_work:
        decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running) \
            and not engine.scheduler.waiting
        start = time.perf_counter()
        engine.step()
        if decoding:
            steps += 1
            elapsed += time.perf_counter() - start
    return 1e3 * elapsed / max(steps, 1)


def compile_times(engine: Engine) -> dict[str, float]:
    fresh = Grammars(engine.tokenizer, engine.model_config.vocab_size, engine.tokenizer.eos_token_ids)
    fresh.lltokenizer  # noqa: B018 (built once per worker at its first grammar; not a per-schema cost)
    schema = {**SCHEMA, "title": f"t{time.time_ns()}"}  # not in any cache
    start = time.perf_counter()
    g = grammar.json_schema(schema)
    validated = time.perf_counter()
    fresh.matcher(g)
    compiled = time.perf_counter()
    fresh.matcher(g)
    cached = time.perf_counter()
    return {"router validation ms": 1e3 * (validated - start), "worker compile ms": 1e3 * (compiled - validated),
            "worker cached ms": 1e3 * (cached - compiled)}


def choices(engine: Engine, uncached: Engine, prompt: list[int], n: int = 8) -> dict[str, dict[str, float]]:
    """Peak blocks and seconds: n choices of one request vs n requests, with the prefix cache (as served)
    and without it (`uncached`: what n separate requests hold when nothing shares their prompt)."""
    def run(requests: list[tuple[str, SamplingParams]], engine: Engine = engine) -> tuple[int, float]:
        start = time.perf_counter()
        for rid, params in requests:
            engine.add_request(rid, prompt, params)
        peak = 0
        while engine.has_work:
            engine.step()
            peak = max(peak, engine.kv.pool.num_blocks - engine.kv.num_free_blocks)
        engine.kv.pool.reset_prefix_cache()
        return peak, time.perf_counter() - start

    params = SamplingParams(max_tokens=32, temperature=1.0, seed=1, ignore_eos=True)
    engine.kv.pool.reset_prefix_cache()
    together = run([("n8", SamplingParams(**{**params.__dict__, "n": n}))])
    apart = run([(f"s{i}", params) for i in range(n)])
    alone = run([(f"u{i}", params) for i in range(n)], uncached)
    return {"n = 8": {"peak blocks": together[0], "seconds": together[1]},
            "8 requests": {"peak blocks": apart[0], "seconds": apart[1]},
            "8 requests, no prefix cache": {"peak blocks": alone[0], "seconds": alone[1]}}


def render(results: dict, path: pathlib.Path) -> str:  # type: ignore[type-arg]
    fig, (ax1, ax2) = figure(2, (10, 4))
    for name, row in results["mask"].items():
        ax1.plot(list(BATCHES), [row[b] for b in BATCHES], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("batch")
    ax1.set_ylabel("mask ms per step")
    ax1.set_title("Grammar mask, 20-field schema")
    d = results["decode"]
    width = 0.35
    ax2.bar([i - width / 2 for i in range(len(BATCHES))], [d[str(b)]["free"] for b in BATCHES], width, label="free")
    ax2.bar([i + width / 2 for i in range(len(BATCHES))], [d[str(b)]["constrained"] for b in BATCHES], width,
            label="JSON schema")
    ax2.set_xticks(range(len(BATCHES)), [f"batch {b}" for b in BATCHES])
    ax2.set_ylabel("decode step ms")
    ax2.set_title("Decode step, SmolLM2-135M bfloat16")
    ax2.legend(fontsize=8)
    save_figure(fig, [ax1, ax2], path)
    mask = results["mask"]
    lines = ["## Structured output", "",
             "`python benchmarks/structured.py` (one process, the same run, 2 shared cores; bundled model, bfloat16).",
             "", "Grammar mask per decode step, 20-field JSON schema, following a valid output:", "",
             "| engine | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
             "|---|" + "---|" * len(BATCHES)]
    lines += [f"| {name} | " + " | ".join(f"{row[b]:.3f} ms" for b in BATCHES) + " |" for name, row in mask.items()]
    lines += ["", "Decode step, constrained (JSON schema) vs free, same prompt and token count (target <= 1.15x):",
              "", "| batch | free | constrained | ratio | target |", "|---|---|---|---|---|"]
    for b in BATCHES:
        row = d[str(b)]
        ratio = row["constrained"] / row["free"]
        lines.append(f"| {b} | {row['free']:.1f} ms | {row['constrained']:.1f} ms | {ratio:.2f}x | "
                     f"{'met' if ratio <= 1.15 else 'not met'} |")
    c = results["compile"]
    lines += ["", f"Compiling the 20-field schema: router validation {c['router validation ms']:.1f} ms, worker "
              f"compile {c['worker compile ms']:.1f} ms, the same schema again (cached) "
              f"{c['worker cached ms']:.2f} ms.", ""]
    lines += ["n = 8 choices vs 8 separate requests with the same prompt, 32 tokens each: peak KV blocks and "
              "seconds. Target: <= 0.5x the blocks of 8 requests that share nothing; served with the prefix cache on, "
              "8 identical concurrent requests share the prompt's full blocks too (once one has computed them), "
              "so n = 8 saves less against those.", "",
              "| prompt tokens | n = 8 | 8 requests, no prefix cache | ratio | 8 requests, prefix cache | ratio |",
              "|---|---|---|---|---|---|"]
    for tokens, ch in results["choices"].items():
        one, cached, alone = ch["n = 8"], ch["8 requests"], ch["8 requests, no prefix cache"]
        vs_alone = one["peak blocks"] / alone["peak blocks"]
        verdict = "met" if vs_alone <= 0.5 else "not met"
        lines.append(f"| {tokens} | {one['peak blocks']} blocks, {one['seconds']:.2f} s | {alone['peak blocks']} "
                     f"blocks, {alone['seconds']:.2f} s | {vs_alone:.2f}x blocks ({verdict}), "
                     f"{one['seconds'] / alone['seconds']:.2f}x time | {cached['peak blocks']} blocks, "
                     f"{cached['seconds']:.2f} s | {one['peak blocks'] / cached['peak blocks']:.2f}x blocks, "
                     f"{one['seconds'] / cached['seconds']:.2f}x time |")
    lines += ["", "![structured](benchmarks/structured.png)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "structured.json"))
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    engine = Engine.from_path(None, EngineConfig(dtype="bfloat16", max_num_seqs=64))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Write a long list of animal names as JSON. "
                                                                       "Use every animal you know of, " * 8}])
    results: dict = {"prompt_tokens": len(prompt)}  # type: ignore[type-arg]
    log("mask costs")
    results["mask"] = mask_costs(engine)
    log("decode steps")
    results["decode"] = {}
    for batch in BATCHES:
        decode_step_ms(engine, prompt, batch, False)  # warm-up
        free = min(decode_step_ms(engine, prompt, batch, False) for _ in range(2))
        constrained = min(decode_step_ms(engine, prompt, batch, True) for _ in range(2))
        results["decode"][str(batch)] = {"free": free, "constrained": constrained}
        log(f"batch {batch}: free {free:.1f} ms, constrained {constrained:.1f} ms")
    results["compile"] = compile_times(engine)
    log("n choices")
    long_prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Summarize this text. " + " ".join(
        f"Sentence {i} of the document says something about topic {i % 7}." for i in range(40))}])
    uncached = Engine.from_path(None, EngineConfig(dtype="bfloat16", max_num_seqs=64, enable_prefix_caching=False))
    results["choices"] = {str(len(p)): choices(engine, uncached, p) for p in (prompt, long_prompt)}
    pathlib.Path(args.output).write_text(json.dumps(results, indent=2))
    body = render(results, ROOT / "benchmarks" / "structured.png")
    if not args.no_report:
        update_section("structured", body)
    log(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
