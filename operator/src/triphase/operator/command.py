"""`triphase operator`: run the kopf operator (honours KUBECONFIG, or in-cluster credentials)."""

from __future__ import annotations

import argparse
import pathlib
import random
import threading
import time
import urllib.parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", action="append", default=[],
                        help="watch this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint URL ('' to disable)")
    parser.add_argument("--peering", default="triphase",
                        help="ClusterKopfPeering name for leader election between replicas")
    parser.add_argument("--standalone", action="store_true", help="no leader election (a single replica)")
    parser.add_argument("--priority", type=_priority, default=0,
                        help="peering priority of this replica (the highest leads; equal ones all freeze), or "
                             "'auto': from the start time in ms plus a random tie-break, so that the replicas "
                             "of one Deployment differ and the newest leads")
    parser.add_argument("--ready-file", help="write the liveness port (or 1) here once the operator is running")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics endpoint")
    parser.add_argument("--metrics-port", type=int, default=8081,
                        help="port of the Prometheus metrics endpoint (/metrics; 0: any free port; -1: off)")
    parser.add_argument("--resync-seconds", type=float, default=30.0,
                        help="period of the level-based resync (drift correction, status refresh)")
    parser.add_argument("--monitoring-label", action="append", default=[], metavar="KEY=VALUE",
                        help="label for the PodMonitors and PrometheusRules it creates, e.g. release=prometheus "
                             "when the Prometheus selects them by label (repeatable)")
    parser.add_argument("--router-cluster-role", default="triphase-router",
                        help="ClusterRole (read pods) the operator binds each router's ServiceAccount to; it may "
                             "bind that one only (the chart names it after its release)")


def _priority(text: str) -> int:
    if text == "auto":
        return time.time_ns() // 1_000_000 * 1000 + random.randrange(1000)  # < 2**53: exact in JSON
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor 'auto'") from None


def _labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--monitoring-label {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    import kopf

    from triphase.operator.settings import SETTINGS

    if args.resync_seconds <= 0:
        raise ValueError("--resync-seconds must be positive")
    SETTINGS.resync_seconds = args.resync_seconds  # read when the handlers register
    SETTINGS.monitoring_labels = _labels(args.monitoring_label)
    SETTINGS.router_cluster_role = args.router_cluster_role

    from triphase.operator import (
        handlers,  # noqa: F401  (registers the handlers)
        metrics,
    )

    if args.metrics_port >= 0:
        from prometheus_client import start_http_server

        server, _ = start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.REGISTRY)
        if args.ready_file:
            pathlib.Path(args.ready_file + ".metrics").write_text(str(server.server_port))

    ready = threading.Event()
    if args.ready_file:
        port = urllib.parse.urlsplit(args.liveness).port if args.liveness else None

        def announce() -> None:
            ready.wait()
            pathlib.Path(args.ready_file).write_text(str(port or 1))

        threading.Thread(target=announce, daemon=True).start()
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace, liveness_endpoint=args.liveness or None,
             peering_name=None if args.standalone else args.peering, standalone=args.standalone,
             priority=args.priority, ready_flag=ready)
    return 0
