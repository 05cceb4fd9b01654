"""`triphase profile`: measure an engine in this process and write its profile (triphase.common.profile).

- prefill: for each prompt length, one request of that many (distinct, uncached) tokens, timed from
  add to its first token: every step it takes (chunks of `max_batched_tokens`) counted;
- decode: for each batch size and context length, that many requests prefilled first, then
  `decode_steps` steps in which every one of them decodes, each timed.
Each measurement is repeated `repeats` times and the fastest kept (the least disturbed by whatever
else runs). Progress goes to stderr; the linear models are fitted to the points.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from triphase.common.profile import Profile
from triphase.workers.engine.sampling import SamplingParams

if TYPE_CHECKING:  # torch: imported by the command that runs, not by every `triphase` command's parser
    from triphase.workers.engine.core import Engine

Say = Callable[[str], None]


def decode_tokens(batch: int, context: int, steps: int, chunk_tokens: int) -> int:
    """Output tokens each sequence of a decode measurement may take: the timed steps, and every step in
    which the batch's other prompts were still being prefilled in chunks of `chunk_tokens` (the first
    ones decode meanwhile; with too few they finished before the last one started, and the timed steps
    ran nothing)."""
    return steps + 2 + batch * -(-context // chunk_tokens)


class Profiler:
    def __init__(self, engine: Engine, say: Say, repeats: int = 2) -> None:
        self.engine = engine
        self.say = say
        self.repeats = repeats
        self.ids = itertools.count()
        self.vocab = engine.model_config.vocab_size
        self.tokens = itertools.count(1000)  # distinct prompts: nothing comes from the prefix cache

    def _prompt(self, length: int) -> list[int]:
        return [next(self.tokens) % (self.vocab - 10) + 5 for _ in range(length)]

    def _finish(self) -> None:
        while self.engine.has_work:
            self.engine.step()

    def prefill_seconds(self, length: int) -> float:
        best = float("inf")
        for _ in range(self.repeats):
            rid = f"p{next(self.ids)}"
            started = time.perf_counter()
            self.engine.add_request(rid, self._prompt(length), SamplingParams(max_tokens=1, temperature=0.0))
            self._finish()
            best = min(best, time.perf_counter() - started)
        return best

    def _decoding(self, mine: set[str]) -> int:
        return sum(1 for r in self.engine.scheduler.running if r.request_id in mine and r.num_output_tokens >= 1)

    def decode_step_seconds(self, batch: int, context: int, steps: int) -> float:
        best = float("inf")
        for _ in range(self.repeats):
            rids = [f"d{next(self.ids)}" for _ in range(batch)]
            tokens = decode_tokens(batch, context, steps, self.engine.config.max_num_batched_tokens)
            sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            for rid in rids:
                self.engine.add_request(rid, self._prompt(context), sampling)
            mine = set(rids)
            while self.engine.has_work and self._decoding(mine) < batch:  # every one of them past its prefill
                self.engine.step()
            timings = []
            for _ in range(steps):
                if (running := self._decoding(mine)) < batch:
                    raise RuntimeError(f"a decode measurement of {batch} x {context} tokens ran with {running} "
                                       "sequences (check --max-num-seqs and --kv-cache-mib)")
                started = time.perf_counter()
                self.engine.step()
                timings.append(time.perf_counter() - started)
            for rid in rids:
                self.engine.abort(rid)
            self._finish()
            best = min(best, sorted(timings)[len(timings) // 2])
        return best

    def run(self, lengths: Sequence[int], batches: Sequence[int], contexts: Sequence[int], steps: int,
            engine_name: str) -> Profile:
        prefill = []
        for length in lengths:
            seconds = self.prefill_seconds(length)
            prefill.append((length, seconds))
            self.say(f"prefill {length:>6} tokens: {seconds * 1e3:8.1f} ms")
        decode = []
        for context in contexts:
            for batch in batches:
                seconds = self.decode_step_seconds(batch, context, steps)
                decode.append((batch, batch * context, seconds))
                self.say(f"decode  {batch:>4} x {context:>5} context: {seconds * 1e3:8.2f} ms/step")
        moe = self.engine.model_config.moe
        return Profile.fit(prefill, decode, model=self.engine.model_config.name, engine=engine_name,
                           experts=moe.num_experts if moe else 0, top_k=moe.top_k if moe else 0)


def _sizes(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(not 1 <= v <= 1 << 20 for v in values):
        raise ValueError(f"{flag}: each value must be in 1..{1 << 20}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from triphase.workers.main import add_engine_arguments

    add_engine_arguments(parser)
    parser.add_argument("--output", "-o", default="profile.json", help="where to write the profile (JSON)")
    parser.add_argument("--prompt-lengths", default="16,64,256,512,1024", help="prefill measurements (tokens)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="decode measurements (sequences per step)")
    parser.add_argument("--contexts", default="128,512", help="decode measurements (context tokens per sequence)")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps timed per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="times each measurement runs (the fastest counts)")


def run(args: argparse.Namespace) -> int:
    from triphase.workers.main import engine_from_args

    lengths = _sizes(args.prompt_lengths, "--prompt-lengths")
    batches = _sizes(args.batch_sizes, "--batch-sizes")
    contexts = _sizes(args.contexts, "--contexts")
    if not 1 <= args.decode_steps <= 1000 or not 1 <= args.repeats <= 100:
        raise ValueError("--decode-steps must be in 1..1000 and --repeats in 1..100")
    if max(batches) > args.max_num_seqs:
        raise ValueError(f"--batch-sizes: {max(batches)} is more than --max-num-seqs {args.max_num_seqs}")

    def say(message: str) -> None:
        sys.stderr.write(f"triphase profile: {message}\n")
        sys.stderr.flush()

    engine = engine_from_args(args)
    batch, context = max(batches), max(contexts)
    tokens = context + decode_tokens(batch, context, args.decode_steps, engine.config.max_num_batched_tokens)
    longest = max(max(lengths), tokens)
    if longest > engine.max_model_len:
        raise ValueError(f"measurements need {longest} tokens of context; the model allows {engine.max_model_len}")
    blocks_needed = batch * -(-tokens // engine.layout.block_size)
    if blocks_needed > engine.layout.num_blocks:
        raise ValueError(f"{max(batches)} sequences of {max(contexts)} tokens need {blocks_needed} KV blocks; "
                         f"--kv-cache-mib gives {engine.layout.num_blocks}")
    say(f"measuring {args.engine} engine ({engine.model_config.name}, {engine.device}, {args.dtype}): "
        f"{len(lengths)} prefill and "
        f"{len(batches) * len(contexts)} decode measurements, {args.repeats} times each")
    profile = Profiler(engine, say, args.repeats).run(lengths, batches, contexts, args.decode_steps, args.engine)
    output = pathlib.Path(args.output)
    profile.save(output)
    say(f"prefill {profile.prefill_base_s * 1e3:.2f} ms + {profile.prefill_per_token_s * 1e3:.4f} ms/token; decode "
        f"{profile.decode_base_s * 1e3:.2f} ms + {profile.decode_per_seq_s * 1e3:.3f} ms/sequence + "
        f"{profile.decode_per_context_token_s * 1e6:.3f} us/context token"
        + (f" + {profile.decode_per_expert_s * 1e3:.3f} ms/expert touched" if profile.experts else ""))
    sys.stdout.write(f"{output}\n")
    return 0
