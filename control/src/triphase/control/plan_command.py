"""`triphase plan`: which prefill/decode split of N workers serves a workload best, by simulation.

For every split of `--workers` into prefill and decode (or the `--splits` given), the discrete-event
model (triphase.control.simulate) runs the workload at each request rate and reports SLO attainment;
a split's goodput is the highest rate whose attainment reaches `--attainment` (DistServe's measure),
per worker the figure to compare. Prints a table (and `--json`), marks the best split and, with
`--png`, plots attainment against rate per split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from triphase.common.profile import Profile
from triphase.control.simulate import Lengths, Request, poisson_requests, simulate

MAX_REQUESTS = 200_000  # per simulation: bounds the work a flag can ask for


def _lengths(text: str, flag: str) -> Lengths:
    low, _, high = text.partition(":")
    try:
        return Lengths(int(low), int(high or low))
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: expected N or LOW:HIGH tokens ({exc})") from None


def _splits(text: str | None, workers: int) -> list[tuple[int, int]]:
    if text is None:
        return [(p, workers - p) for p in range(1, workers)]
    splits = []
    for item in text.split(","):
        p, sep, d = item.partition(":")
        if not sep or not p.strip().isdigit() or not d.strip().isdigit() or int(p) < 1 or int(d) < 1:
            raise ValueError(f"--splits {item!r}: expected PREFILL:DECODE, each at least 1")
        splits.append((int(p), int(d)))
    return splits


def load_trace(path: pathlib.Path) -> list[Request]:
    """JSON lines: {"arrival_s": ..., "prompt_tokens": ..., "output_tokens": ...}, in any order."""
    requests = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--trace {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            request = Request(float(item["arrival_s"]), int(item["prompt_tokens"]), int(item["output_tokens"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--trace {path}:{number}: {exc}") from None
        lengths_ok = 1 <= request.prompt_tokens <= 1 << 20 and 1 <= request.output_tokens <= 1 << 20
        if request.arrival_s < 0 or not lengths_ok:
            raise ValueError(f"--trace {path}:{number}: arrival must be >= 0 and lengths in 1..{1 << 20}")
        requests.append(request)
        if len(requests) > MAX_REQUESTS:
            raise ValueError(f"--trace {path}: more than {MAX_REQUESTS} requests")
    if len(requests) < 2:
        raise ValueError(f"--trace {path}: needs at least 2 requests")
    return sorted(requests, key=lambda r: r.arrival_s)


def at_rate(trace: Sequence[Request], rate: float) -> list[Request]:
    """The trace's requests with arrivals stretched or squeezed to `rate` per second (shape kept)."""
    span = trace[-1].arrival_s - trace[0].arrival_s
    factor = (len(trace) - 1) / rate / span if span > 0 else 0.0
    return [dataclasses.replace(r, arrival_s=(r.arrival_s - trace[0].arrival_s) * factor) for r in trace]


def goodput(rates: Sequence[float], attainment: Sequence[float], target: float) -> float:
    """The highest rate at which attainment still reaches `target` (linear between grid points; 0 if
    even the lowest rate misses it)."""
    best = 0.0
    for i, (rate, value) in enumerate(zip(rates, attainment, strict=True)):
        if value < target:
            if i > 0 and attainment[i - 1] >= target:
                r0, a0 = rates[i - 1], attainment[i - 1]
                best = r0 + (rate - r0) * (a0 - target) / (a0 - value)
            break
        best = rate
    return best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="worker profile (`triphase profile`) for both pools")
    parser.add_argument("--decode-profile", help="a different profile for the decode workers")
    parser.add_argument("--workers", type=int, default=4, help="workers to split (every split is tried)")
    parser.add_argument("--splits", help="only these splits, e.g. 1:3,2:2")
    parser.add_argument("--rates", help="request rates per second, e.g. 0.5,1,2 (default: a grid up to what "
                                        "all workers could prefill)")
    parser.add_argument("--prompt", default="512:1536", help="prompt tokens, N or LOW:HIGH (uniform)")
    parser.add_argument("--output", default="32:96", help="output tokens, N or LOW:HIGH (uniform)")
    parser.add_argument("--trace", help="JSON lines of arrival_s, prompt_tokens, output_tokens (replaces the "
                                        "Poisson workload; its arrivals are scaled to each rate)")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds of arrivals per run")
    parser.add_argument("--ttft", type=float, default=2.0, help="TTFT target, seconds")
    parser.add_argument("--tpot", type=float, default=0.1, help="TPOT target, seconds")
    parser.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="prefill tokens per step (--max-batched-tokens)")
    parser.add_argument("--max-seqs", type=int, default=64, help="sequences per decode step (--max-num-seqs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--png", help="plot attainment against rate per split into this file")


@dataclasses.dataclass(frozen=True)
class SplitResult:
    prefill: int
    decode: int
    attainment: tuple[float, ...]
    goodput: float

    @property
    def per_worker(self) -> float:
        return self.goodput / (self.prefill + self.decode)


def plan(profile: Profile, decode_profile: Profile, splits: Sequence[tuple[int, int]], rates: Sequence[float],
         workload: Any, slo: tuple[float, float], target: float, chunk: int, max_seqs: int) -> list[SplitResult]:
    """`workload(rate)` gives the requests at that rate."""
    merged = dataclasses.replace(profile, decode_base_s=decode_profile.decode_base_s,
                                 decode_per_seq_s=decode_profile.decode_per_seq_s,
                                 decode_per_context_token_s=decode_profile.decode_per_context_token_s)
    results = []
    requests = {rate: workload(rate) for rate in rates}
    for p, d in splits:
        values = tuple(simulate(merged, p, d, requests[rate], chunk_tokens=chunk, max_seqs=max_seqs)
                       .attainment(*slo) for rate in rates)
        results.append(SplitResult(p, d, values, goodput(rates, values, target)))
    return results


def run(args: argparse.Namespace) -> int:
    profile = Profile.load(pathlib.Path(args.profile))
    decode_profile = Profile.load(pathlib.Path(args.decode_profile)) if args.decode_profile else profile
    if not 2 <= args.workers <= 256:
        raise ValueError("--workers must be in 2..256")
    splits = _splits(args.splits, args.workers)
    if not (args.ttft > 0 and args.tpot > 0 and 0 < args.attainment <= 1 and 0 < args.duration <= 86400):
        raise ValueError("--ttft and --tpot must be positive, --attainment in (0, 1], --duration in (0, 86400]")
    if not (1 <= args.chunk_tokens <= 1 << 20 and 1 <= args.max_seqs <= 4096):
        raise ValueError("--chunk-tokens must be in 1..1048576 and --max-seqs in 1..4096")
    prompt, output = _lengths(args.prompt, "--prompt"), _lengths(args.output, "--output")
    trace = load_trace(pathlib.Path(args.trace)) if args.trace else None
    mean_prompt = (sum(r.prompt_tokens for r in trace) / len(trace)) if trace else (prompt.low + prompt.high) / 2
    if args.rates:
        try:
            rates = sorted({float(r) for r in args.rates.split(",") if r.strip()})
        except ValueError:
            raise ValueError(f"--rates {args.rates!r}: expected comma-separated numbers") from None
    else:  # up to what every worker prefilling could sustain
        ceiling = args.workers * args.chunk_tokens / profile.prefill_s(args.chunk_tokens) / mean_prompt
        rates = [round(ceiling * i / 16, 4) for i in range(1, 17)]
    if not rates or rates[0] <= 0 or any(r * args.duration > MAX_REQUESTS for r in rates):
        raise ValueError(f"--rates must be positive and rate * --duration at most {MAX_REQUESTS} requests")

    def workload(rate: float) -> list[Request]:
        return at_rate(trace, rate) if trace else poisson_requests(rate, args.duration, prompt, output, args.seed)

    results = plan(profile, decode_profile, splits, rates, workload, (args.ttft, args.tpot), args.attainment,
                   args.chunk_tokens, args.max_seqs)
    best = max(results, key=lambda r: (r.per_worker, -r.prefill - r.decode))
    if args.json:
        sys.stdout.write(json.dumps({
            "rates": rates, "slo": {"ttft_s": args.ttft, "tpot_s": args.tpot, "attainment": args.attainment},
            "splits": [{"prefill": r.prefill, "decode": r.decode, "attainment": r.attainment, "goodput": r.goodput,
                        "goodput_per_worker": r.per_worker} for r in results],
            "best": {"prefill": best.prefill, "decode": best.decode}}) + "\n")
    else:
        shown = rates if len(rates) <= 8 else rates[:: max(1, len(rates) // 8)]
        header = "split (P:D)  " + " ".join(f"{r:>7g}" for r in shown) + "   goodput  per worker"
        lines = [f"SLO attainment by request rate (req/s); TTFT <= {args.ttft:g} s, TPOT <= {args.tpot:g} s, "
                 f"target {args.attainment:.0%}", header]
        for r in results:
            cells = " ".join(f"{r.attainment[rates.index(x)]:>7.1%}" for x in shown)
            mark = "  <- best" if r is best else ""
            lines.append(f"{r.prefill:>5}:{r.decode:<6} {cells}   {r.goodput:7.3f}  {r.per_worker:9.3f}{mark}")
        sys.stdout.write("\n".join(lines) + "\n")
    if args.png:
        _plot(pathlib.Path(args.png), rates, results, best, args)
    return 0


def _plot(path: pathlib.Path, rates: Sequence[float], results: Sequence[SplitResult], best: SplitResult,
          args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        ax.plot(rates, [100 * a for a in r.attainment], marker="o", markersize=3,
                linewidth=2.5 if r is best else 1.2, label=f"{r.prefill}P:{r.decode}D (goodput {r.goodput:.2f}/s)")
    ax.axhline(100 * args.attainment, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"triphase plan: TTFT <= {args.ttft:g} s, TPOT <= {args.tpot:g} s")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
