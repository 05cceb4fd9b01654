"""Chaos on the local stack (the long run; the suite's short one is tests/e2e/test_chaos.py).

`triphase up --dtype float32 --prefill 1 --decode 2` on the real model. A fault-free pass records each
prompt's greedy output; then `--requests` greedy chat completions (half streamed, `--concurrency` at a
time, the `openai` client without retries) run while a worker is SIGKILLed every `--interval` seconds,
alternating prefill and decode, and `triphase up` restarts it. Then the router is SIGKILLed under load.
Counts failed requests, outputs that differ from the fault-free pass, KV left on any worker, and the
router's RSS before and after. Writes the "chaos" section of docs/reliability.md.

With `--role-switching`: sim workers (2 prefill + 2 decode) and the role balancer, under a load that
alternates prompt-heavy phases (1000-word prompts, 8 tokens) with decode-heavy ones (short prompts, 48
tokens) so that the balancer moves workers, while workers are SIGKILLed as above. Prints how many
switches happened during the faults (a run with none proves nothing about switches) and writes the
"chaos-switching" section.

    python benchmarks/chaos.py                       # 1000 requests, a kill every 10 s
    python benchmarks/chaos.py --requests 100 --interval 5
    python benchmarks/chaos.py --role-switching --requests 400 --interval 8
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time

from report import ROOT, log, update_section

sys.path.insert(0, str(ROOT))
from roles import SWITCHING, TIMING, balancer_metrics_url, switch_counts

from tests.chaos import PROMPTS, Killer, Outcome, all_idle, children, load, rss_mib
from triphase.common.security import mtls
from triphase.local.processes import http_ok, triphase_up, up_bundle, wait_for

MAX_TOKENS = 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--role-switching", action="store_true",
                        help="sim workers and the role balancer under a shifting load (see the module docstring)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/reliability.md alone")
    args = parser.parse_args()
    if args.role_switching:
        switching(args)
        return

    with triphase_up(["--dtype", "float32", "--prefill", "1", "--decode", "2", "--kv-cache-mib", "64"]) as (proc, url):
        fault_free = asyncio.run(load(url, len(PROMPTS), 4, MAX_TOKENS))
        expected = {o.index: o.text for o in fault_free}
        router = children(proc.pid)["router"]
        rss_before = rss_mib(router)

        log(f"{args.requests} requests, a worker SIGKILLed every {args.interval:g} s")
        killer = Killer(proc.pid, args.interval, ["prefill-0", "decode-0", "prefill-0", "decode-1"])
        started = time.monotonic()
        killer.start()
        try:
            outcomes = asyncio.run(load(url, args.requests, args.concurrency, MAX_TOKENS, progress=lambda n: n % 50 or
                                        log(f"{n}/{args.requests} done, {len(killer.kills)} kills")))
        finally:
            killer.stop()
        seconds = time.monotonic() - started
        failed = [o for o in outcomes if o.text is None]
        differ = [o for o in outcomes if o.text is not None and o.text != expected[o.index]]
        for o in differ:
            log(f"differs: {o.request_id} (prompt {o.index}): expected {expected[o.index]!r}, got {o.text!r}; "
                "its resumes and failed hand-offs are in the router log under that id")
        for error, count in collections.Counter(o.error for o in failed).most_common():
            log(f"failed {count}x: {error}")
        idle = _settled(url, up_bundle(proc))
        rss_after = rss_mib(router)

        log("router SIGKILLed under load")
        killed_at = {"n": 0}

        def kill_router(n: int) -> None:
            if n == 8 and not killed_at["n"]:
                killed_at["n"] = n
                children(proc.pid)["router"].kill()

        during = asyncio.run(load(url, 32, args.concurrency, MAX_TOKENS, progress=kill_router))
        wait_for(lambda: http_ok(f"{url}/readyz"), 60, "the router back")
        after = asyncio.run(load(url, 16, args.concurrency, MAX_TOKENS))
        router_errors = sorted({o.error.split(":")[0] for o in during if o.text is None})
        router_idle = _settled(url, up_bundle(proc))

    rows = [
        ("Workers SIGKILLed under load", f"{args.requests} chat completions, {args.concurrency} concurrent, half "
         f"streamed, {MAX_TOKENS} tokens, {seconds:.0f} s", f"{len(killer.kills)} SIGKILLs, every {args.interval:g} s "
         "(prefill, decode-0, prefill, decode-1, ...), restarted by `triphase up`",
         f"{len(failed)} failed, {len(differ)} outputs differ from the fault-free run; KV all free after: {idle}; "
         f"router RSS {rss_before:.0f} -> {rss_after:.0f} MiB"),
        ("Router SIGKILLed under load", f"32 chat completions, {args.concurrency} concurrent, then 16 after",
         "1 SIGKILL after 8 completed, restarted on its port",
         f"in flight or sent while down: {sum(o.text is None for o in during)} failed with {', '.join(router_errors)} "
         f"(client-side connection errors, no 5xx); after: {sum(o.text is None for o in after)} failed, "
         f"{sum(o.text != expected[o.index] for o in after)} differ; KV all free after: {router_idle}"),
    ]
    table = "| fault | load | injected | result |\n|---|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    body = (f"Recorded with `python benchmarks/chaos.py --requests {args.requests} --interval {args.interval:g} "
            f"--concurrency {args.concurrency}` ({time.strftime('%Y-%m-%d')}, 2-core VM, real model in float32).\n\n"
            + table)
    sys.stdout.write(body + "\n")
    if not args.no_write:
        update_section("chaos", body, ROOT / "docs" / "reliability.md")
    if failed or differ:
        raise SystemExit(1)


LONG = [f"Question {i}: " + "hello " * 1000 for i in range(4)]  # prompt-heavy: 1000 words, 8 tokens out


def switching(args: argparse.Namespace) -> None:
    """Workers SIGKILLed while the load makes the balancer switch roles (issue 25)."""
    up = ["--engine", "sim", "--prefill", "2", "--decode", "2", "--kv-cache-mib", "64", *TIMING, *SWITCHING]
    with triphase_up(up) as (proc, url):
        metrics = balancer_metrics_url(proc.pid)
        expected = {"long": {o.index: o.text for o in asyncio.run(load(url, len(LONG), 4, 8, prompts=LONG))},
                    "short": {o.index: o.text for o in asyncio.run(load(url, len(PROMPTS), 4, 48))}}
        before, _ = switch_counts(metrics)
        phases = 4
        per_phase = max(1, args.requests // phases)
        log(f"{per_phase * phases} requests in {phases} alternating phases, a worker SIGKILLed every "
            f"{args.interval:g} s, role switching on")
        killer = Killer(proc.pid, args.interval, ["prefill-0", "decode-0", "prefill-1", "decode-1"])
        started = time.monotonic()
        killer.start()
        outcomes: list[tuple[str, Outcome]] = []
        try:
            for phase in range(phases):
                kind = "long" if phase % 2 == 0 else "short"
                done = asyncio.run(load(url, per_phase, args.concurrency, 8 if kind == "long" else 48,
                                        prompts=LONG if kind == "long" else PROMPTS))
                outcomes += [(kind, o) for o in done]
                log(f"phase {phase + 1}/{phases} ({kind} prompts): {sum(o.text is None for o in done)} failed, "
                    f"{switch_counts(metrics)[0] - before} switches so far, {len(killer.kills)} kills")
        finally:
            killer.stop()
        seconds = time.monotonic() - started
        switches = switch_counts(metrics)[0] - before
        failed = [o for _, o in outcomes if o.text is None]
        differ = [o for kind, o in outcomes if o.text is not None and o.text != expected[kind][o.index]]
        for error, count in collections.Counter(o.error for o in failed).most_common():
            log(f"failed {count}x: {error}")
        idle = _settled(url, up_bundle(proc))
    sys.stdout.write(f"role switches during the faults: {switches}\n")
    body = (f"Recorded with `python benchmarks/chaos.py --role-switching --requests {args.requests} --interval "
            f"{args.interval:g} --concurrency {args.concurrency}` ({time.strftime('%Y-%m-%d')}, 2-core VM, sim "
            f"workers, 2 prefill + 2 decode, the role balancer on).\n\n"
            "| load | injected | role switches | result |\n|---|---|---|---|\n"
            f"| {len(outcomes)} chat completions in 4 phases, prompt-heavy (1000 words, 8 tokens) and "
            f"decode-heavy (48 tokens) alternating, {args.concurrency} concurrent, half streamed, {seconds:.0f} s | "
            f"{len(killer.kills)} SIGKILLs every {args.interval:g} s (prefill-0, decode-0, prefill-1, decode-1, ...), "
            f"restarted by `triphase up` | **{switches}** | {len(failed)} failed, {len(differ)} outputs differ "
            f"from the fault-free run; KV all free after: {idle} |")
    sys.stdout.write(body + "\n")
    if not args.no_write:
        update_section("chaos-switching", body, ROOT / "docs" / "reliability.md")
    if failed or differ or not switches:
        raise SystemExit(1)


def _settled(url: str, bundle: mtls.Bundle | None) -> bool:
    try:
        wait_for(lambda: all_idle(url, bundle), 90, "every worker idle with all KV free")
    except TimeoutError:
        return False
    return True


if __name__ == "__main__":
    main()
