"""`triphase prometheus build|up`: the local Prometheus from the command line."""

from __future__ import annotations

import argparse
import signal
import sys

from triphase.local import prometheus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["build", "up"],
                        help="build: only build prometheus and promtool (prints their directory); "
                             "up: run one that scrapes --scrape targets until Ctrl-C")
    parser.add_argument("--scrape", action="append", default=[], metavar="JOB=HOST:PORT[,HOST:PORT]",
                        help="targets to scrape (/metrics), per job; repeatable")
    parser.add_argument("--port", type=int, default=9090, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--scrape-interval", type=float, default=1.0, metavar="SECONDS")


def jobs_from(specs: list[str]) -> dict[str, list[str]]:
    jobs: dict[str, list[str]] = {}
    for spec in specs:
        job, sep, targets = spec.partition("=")
        listed = [t.strip() for t in targets.split(",") if t.strip()]
        if not sep or not job or not listed or any(":" not in t for t in listed):
            raise ValueError(f"--scrape {spec!r}: expected JOB=HOST:PORT[,HOST:PORT...]")
        jobs.setdefault(job, []).extend(listed)
    return jobs


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        sys.stdout.write(f"{prometheus.ensure().bin}\n")
        return 0
    if not 0 < args.scrape_interval <= 60 or not 0 < args.port < 65536:
        raise ValueError("--scrape-interval must be in (0, 60] seconds and --port in 1..65535")
    jobs = jobs_from(args.scrape)
    if not jobs:
        raise ValueError("give at least one --scrape JOB=HOST:PORT")

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    with prometheus.Prometheus(prometheus.scrape_config(jobs, args.scrape_interval), port=args.port) as server:
        sys.stdout.write(f"prometheus at {server.url} (data: {server.workdir})\n")
        sys.stdout.flush()
        try:
            if server.proc is not None:
                server.proc.wait()
        except KeyboardInterrupt:
            return 0
    return 1  # it exited on its own
