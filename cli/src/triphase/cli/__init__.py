"""The `triphase` command: parses arguments and hands each subcommand to its component.

Components are imported only when their subcommand runs, so `triphase --help` is instant and
a broken optional dependency of one component cannot break another's command. Errors a user can
fix (`UserError`, `ValueError` from input validation) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triphase", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from triphase.workers import generate

    gen = sub.add_parser("generate", help="generate a completion with the local engine")
    generate.add_arguments(gen)
    gen.set_defaults(run=generate.run, log_level="WARNING")

    worker = sub.add_parser("worker", help="serve the engine over gRPC (prefill, decode or both)")
    from triphase.workers import main as worker_main

    worker_main.add_arguments(worker)
    worker.set_defaults(run=worker_main.run, log_level="INFO")

    from triphase.workers import profile

    profile_parser = sub.add_parser("profile", help="measure the engine's prefill and decode speed into a profile")
    profile.add_arguments(profile_parser)
    profile_parser.set_defaults(run=profile.run, log_level="WARNING")

    from triphase.router import main as router_main

    router = sub.add_parser("router", help="the OpenAI-compatible front end over a list of workers")
    router_main.add_arguments(router)
    router.set_defaults(run=router_main.run, log_level="INFO")

    from triphase.control import main as balancer_main

    balancer = sub.add_parser("balancer", help="the role balancer over a list of workers (prefill <-> decode)")
    balancer_main.add_arguments(balancer)
    balancer.set_defaults(run=balancer_main.run, log_level="INFO")

    from triphase.control import plan_command

    plan_parser = sub.add_parser("plan", help="simulate prefill/decode splits for a workload from a profile")
    plan_command.add_arguments(plan_parser)
    plan_parser.set_defaults(run=plan_command.run, log_level="WARNING")

    from triphase.cli import up

    up_parser = sub.add_parser("up", help="router + prefill + decode workers on 127.0.0.1 (Ctrl-C stops all)")
    up.add_arguments(up_parser)
    up_parser.set_defaults(run=up.run, log_level="WARNING")

    from triphase.operator import command as operator

    operator_parser = sub.add_parser("operator", help="the Kubernetes operator for ServingDeployments (kopf)")
    operator.add_arguments(operator_parser)
    operator_parser.set_defaults(run=operator.run, log_level="INFO")

    from triphase.cli import check

    check_parser = sub.add_parser("check", help="probe HTTP endpoints: each must answer 2xx (helm test)")
    check.add_arguments(check_parser)
    check_parser.set_defaults(run=check.run, log_level="WARNING")

    from triphase.local.cluster import command as cluster

    cluster_parser = sub.add_parser("cluster", help="a local Kubernetes control plane with fake GPU nodes (kwok)")
    cluster.add_arguments(cluster_parser)
    cluster_parser.set_defaults(run=cluster.run, log_level="WARNING")

    from triphase.local import command as prometheus

    prometheus_parser = sub.add_parser("prometheus", help="a local Prometheus, built from the Go module proxy")
    prometheus.add_arguments(prometheus_parser)
    prometheus_parser.set_defaults(run=prometheus.run, log_level="WARNING")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from triphase.common.errors import UserError
    from triphase.common.process import logs
    from triphase.common.process.lifetime import follow_parent

    follow_parent()
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    try:
        return int(args.run(args))
    except (UserError, ValueError) as exc:
        sys.stderr.write(f"triphase: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
