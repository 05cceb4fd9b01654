"""`triphase cluster up|down|status|build`: the local control plane from the command line."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from triphase.local.cluster import binaries, controlplane


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status", "build"],
                        help="up: start (idempotent); down: stop and remove; status: what runs; "
                             "build: only build the binaries")
    parser.add_argument("--kubeconfig", type=pathlib.Path,
                        help="also write the admin kubeconfig here (default: <state>/kubeconfig)")
    parser.add_argument("--state", type=pathlib.Path, help="state directory (default: under the user's cache)")
    parser.add_argument("--nodes", type=int, default=4, help="fake GPU nodes (kwok)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="nvidia.com/gpu capacity of each node")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for readiness")


def run(args: argparse.Namespace) -> int:
    if args.nodes < 0 or args.gpus_per_node < 0:
        raise ValueError("--nodes and --gpus-per-node must be >= 0")
    if args.action == "build":
        sys.stdout.write(f"{binaries.ensure().bin}\n")
    elif args.action == "up":
        cluster = controlplane.up(args.state, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                  kubeconfig=args.kubeconfig, timeout=args.timeout)
        sys.stdout.write(f"{args.kubeconfig or cluster.kubeconfig}\n")
    elif args.action == "down":
        controlplane.down(args.state)
    else:
        report = controlplane.status(args.state)
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0 if report["healthy"] else 1
    return 0
