"""`triphase balancer`: the role balancer over a static list of workers (what `triphase up
--role-switching` runs beside the router). Serves its metrics on `--port` (127.0.0.1)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib

from prometheus_client import CollectorRegistry, start_http_server

from triphase.common.process import endpoints_file
from triphase.common.process.signals import wait_for_stop_signal
from triphase.common.security import mtls
from triphase.common.security.pki import Identity
from triphase.control.balancer import Settings, Slo
from triphase.control.metrics import BalancerMetrics
from triphase.control.runner import start_balancer

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    workers = parser.add_mutually_exclusive_group(required=True)
    workers.add_argument("--workers", help="comma-separated worker gRPC endpoints (host:port)")
    workers.add_argument("--workers-file", help="a file of worker endpoints (one host:port per line) to follow "
                                                "as it changes (`triphase up --autoscale` rewrites it)")
    add_policy_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="metrics address")
    parser.add_argument("--port", type=int, default=0, help="metrics port (0: any free port)")
    parser.add_argument("--ready-file", help="write the bound metrics port here once running (for supervisors)")
    mtls.add_argument(parser)


def add_policy_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The SLO and the limits, shared with `triphase up --role-switching`."""
    defaults = Settings()
    parser.add_argument("--ttft-slo", type=float, default=2.0, metavar="SECONDS", help="time to first token target")
    parser.add_argument("--tpot-slo", type=float, default=0.1, metavar="SECONDS", help="time per output token target")
    parser.add_argument("--max-switches-per-minute", type=int, default=defaults.max_switches_per_minute)
    parser.add_argument("--min-per-role", type=int, default=defaults.min_per_role,
                        help="ready workers prefill and decode each keep at least")
    parser.add_argument("--switch-cooldown", type=float, default=defaults.cooldown_s, metavar="SECONDS",
                        help="a switched worker keeps its new role at least this long")
    parser.add_argument("--switch-grace", type=float, default=5.0, metavar="SECONDS",
                        help="how long a switching worker lets its in-flight streams finish before handing them over")


def policy_argv(args: argparse.Namespace) -> list[str]:
    """The policy arguments as a command line (for a supervisor starting `triphase balancer`)."""
    return ["--ttft-slo", str(args.ttft_slo), "--tpot-slo", str(args.tpot_slo),
            "--max-switches-per-minute", str(args.max_switches_per_minute), "--min-per-role", str(args.min_per_role),
            "--switch-cooldown", str(args.switch_cooldown), "--switch-grace", str(args.switch_grace)]


def settings_from(args: argparse.Namespace) -> tuple[Slo, Settings]:
    if not (args.ttft_slo > 0 and args.tpot_slo > 0):
        raise ValueError("--ttft-slo and --tpot-slo must be positive")
    if args.switch_cooldown < 0 or args.switch_grace < 0:
        raise ValueError("--switch-cooldown and --switch-grace must not be negative")
    return Slo(args.ttft_slo, args.tpot_slo), Settings(max_switches_per_minute=args.max_switches_per_minute,
                                                       min_per_role=args.min_per_role, cooldown_s=args.switch_cooldown)


def run(args: argparse.Namespace) -> int:
    workers_file = pathlib.Path(args.workers_file) if args.workers_file else None
    endpoints = [e.strip() for e in (args.workers or "").split(",") if e.strip()]
    if workers_file is None and not endpoints:
        raise ValueError("--workers names no endpoint")
    slo, settings = settings_from(args)
    registry = CollectorRegistry()
    server, _ = start_http_server(args.port, addr=args.host, registry=registry)
    port = int(server.server_port)
    metrics = BalancerMetrics(registry)
    logger.info("Role balancer over %s (TTFT %.3g s, TPOT %.3g s); metrics on %s:%d",
                workers_file or f"{len(endpoints)} workers", slo.ttft_s, slo.tpot_s, args.host, port)
    if args.ready_file:
        pathlib.Path(args.ready_file).write_text(str(port))
    bundle = mtls.from_args(args, Identity.CONTROL)
    return asyncio.run(_balance(endpoints, workers_file, slo, settings, args.switch_grace, metrics, bundle))


async def _balance(endpoints: list[str], workers_file: pathlib.Path | None, slo: Slo, settings: Settings,
                   grace_s: float, metrics: BalancerMetrics, bundle: mtls.Bundle | None = None) -> int:
    balancer = start_balancer(slo, settings, grace_s, bundle, metrics)
    balancer.set_endpoints(endpoints)
    stop = asyncio.create_task(wait_for_stop_signal())
    following = asyncio.create_task(endpoints_file.follow(workers_file, balancer.set_endpoints)) if workers_file \
        else None
    try:
        await asyncio.wait({balancer.task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if balancer.task.done():
            balancer.task.result()  # the loop never ends on its own: raise what ended it (the process exits 1)
    finally:
        for t in (stop, *([following] if following else [])):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await balancer.stop()
    return 0
