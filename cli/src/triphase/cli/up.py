"""`triphase up`: the whole local stack (router + prefill + decode workers, and encode workers with
`--encode`) on 127.0.0.1.

With `--role-switching` the role balancer (`triphase balancer`) runs beside the router and moves
workers between prefill and decode as the load shifts, against `--ttft-slo` / `--tpot-slo`.

Starts each worker and the router as supervised child processes (triphase.local.supervisor: a child
that exits is restarted on the port it had), shows progress while the model loads, prints the URL and
a curl example, and stops every child on Ctrl-C or SIGTERM.

Security (docs/security.md): the components talk mTLS with certificates of a CA made for this stack
(under LOGS/mtls/, one directory per identity; `--no-mtls` for plaintext), KV and embedding reads need
the prefill or encode worker's ticket, and prefix-cache hashes are salted. `--api-key` (or
`--api-key-file`, re-read when it changes) makes the API ask clients for a key.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, start_http_server
from pydantic import ValidationError

from triphase.common import images, labels, slo_rules
from triphase.common.errors import UserError
from triphase.common.models.files import resolve
from triphase.common.models.vision import vision_config_of
from triphase.common.process.net import check_port, free_port
from triphase.common.profile import Profile
from triphase.common.roles import Role
from triphase.common.security import mtls
from triphase.common.security.pki import Identity
from triphase.common.stack import SIM_TIMING, Engine, Stack
from triphase.control import main as balancer
from triphase.control import planner, signals
from triphase.control.metrics import PlannerMetrics
from triphase.local import autoscale, demo_vision, prometheus
from triphase.local.supervisor import Supervisor
from triphase.operator.api.v1alpha1 import Slo
from triphase.router import api_keys
from triphase.workers.main import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="router port")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    parser.add_argument("--encode", type=int, default=0,
                        help="encode workers, which turn images into embeddings for the prefill workers (default 0: "
                             "prefill workers encode); needs a model that takes images")
    parser.add_argument("--model", help="GGUF file or Hugging Face directory (default: bundled SmolLM2-135M); "
                                        "demo-vision: SmolLM2 with an image backbone, to try --encode offline "
                                        "(plumbing only: not a trained vision-language model)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--engine", default="torch", choices=["torch", "sim"],
                        help="sim: workers with a timing model instead of the model (no weights loaded)")
    add_device_arguments(parser)
    parser.add_argument("--kv-cache-mib", type=int,
                        help="per worker (default: 256 with --device cpu; else each worker's own default: "
                             "512 on a CPU, on a GPU its share of --gpu-memory-fraction, split evenly between "
                             "the workers that share the machine)")
    images.add_arguments(parser)  # passed to the router and the workers
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the stack to be ready")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="on Ctrl-C / SIGTERM: seconds each process may take to finish its requests")
    parser.add_argument("--routing-policy", choices=["kv-aware", "least-loaded", "round-robin"], default="kv-aware",
                        help="the router's placement policy (see `triphase router --help`)")
    for name in SIM_TIMING:
        parser.add_argument("--" + name.replace("_", "-"), type=float, help="passed to the sim workers")
    parser.add_argument("--prometheus", action="store_true",
                        help="also run a Prometheus (built from the Go module proxy on first use) that scrapes "
                             "the router, the workers and the balancer every second")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    security = parser.add_argument_group("security")
    security.add_argument("--api-key", action="append", default=[], metavar="KEY",
                          help="clients must send this key (`Authorization: Bearer KEY`); repeat for several")
    security.add_argument("--api-key-file", type=pathlib.Path,
                          help="or the keys in this file (`KEY` or `NAME KEY` per line), re-read when it changes")
    security.add_argument("--no-mtls", dest="mtls", action="store_false",
                          help="plaintext between the components (default: mTLS with certificates made at start)")
    scaling = parser.add_argument_group("autoscaling (the planner; implies --prometheus)")
    scaling.add_argument("--autoscale", action="store_true",
                         help="run the planner: it starts and stops workers from what Prometheus measures")
    scaling.add_argument("--planner-interval", type=float, default=10.0, metavar="SECONDS",
                         help="planner period, and the window its rates and percentiles cover")
    scaling.add_argument("--stabilization", type=float, default=60.0, metavar="SECONDS",
                         help="a pool shrinks only when every recommendation this long agrees")
    scaling.add_argument("--slo-percentile", type=float, default=90.0, help="percentile the SLO targets apply to")
    scaling.add_argument("--planner-profile", metavar="PATH",
                         help="capacity from this `triphase profile`: decode step times instead of fitting what "
                              "workers report, a prefill rate until one is measured")
    for role in ("prefill", "decode"):
        scaling.add_argument(f"--min-{role}", type=int, default=1, help=f"fewest {role} workers")
        scaling.add_argument(f"--max-{role}", type=int, default=4, help=f"most {role} workers")
    switching = parser.add_argument_group("role switching")
    switching.add_argument("--role-switching", action="store_true",
                           help="run the role balancer: workers move between prefill and decode as load shifts")
    balancer.add_policy_arguments(switching)


def _kv_size(args: argparse.Namespace, workers: int) -> tuple[int | None, float | None]:
    """Each worker's KV size (MiB, or a GPU memory fraction): the one asked for; 256 MiB on the CPU; on
    a GPU an even split of the memory fraction (each worker sizes its share of what is free when it has
    loaded its weights)."""
    if args.kv_cache_mib is not None:
        return args.kv_cache_mib, None
    if args.device == "cpu" or args.engine == "sim":
        return 256, None
    return None, round(args.gpu_memory_fraction / max(workers, 1), 4)


def _say(message: str) -> None:
    sys.stderr.write(f"triphase up: {message}\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    stack = Supervisor(pathlib.Path(tempfile.mkdtemp(prefix="triphase-up-")), _say)
    server: prometheus.Prometheus | None = None

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        served = None
        if args.model == demo_vision.NAME:
            args.model, served = str(demo_vision.ensure()), demo_vision.NAME
        deadline = time.monotonic() + args.timeout
        key_file = _api_key_file(args, stack.tmp)
        bundles = mtls.write_deployment(stack.tmp / "mtls", labels.LOCAL_NAME) if args.mtls else {}
        secured = {identity: ["--mtls-dir", str(path)] for identity, path in bundles.items()}
        limits = images.limits_from_args(args)
        sim = {name: getattr(args, name) for name in SIM_TIMING if getattr(args, name) is not None}
        if sim and args.engine != "sim":
            raise UserError(f"--{next(iter(sim)).replace('_', '-')} needs --engine sim")
        described = Stack(model=args.model, served_name=served, drain_timeout_s=args.drain_timeout, images=limits,
                          routing_policy=args.routing_policy)
        kv_mib, fraction = _kv_size(args, args.prefill + args.decode + args.encode)
        engine = Engine(dtype=args.dtype, engine=args.engine, device=args.device, kv_cache_mib=kv_mib,
                        gpu_memory_fraction=fraction, sim=sim)

        def worker_argv(role: str) -> list[str]:
            return [*described.worker_args(role, engine), "--port", "0", *secured.get(Identity.WORKER, [])]

        check_port("--port", args.port)  # taken or out of range: one line now, not after the model loads
        if args.prometheus:
            check_port("--prometheus-port", args.prometheus_port)
        if args.role_switching:
            balancer.settings_from(args)  # a bad SLO or limit is a one-line error before anything starts
        if args.autoscale:
            _check_autoscaling(args)
            args.prometheus = True
        # The SLO whose rules Prometheus loads: bounded (the CRD's limits) before any worker starts.
        slo_spec = _slo_spec(args) if args.prometheus else None
        names = [(f"prefill-{i}", "prefill") for i in range(args.prefill)]
        names += [(f"decode-{i}", "decode") for i in range(args.decode)]
        if not names or args.decode + args.prefill == 0:
            raise UserError("at least one worker is needed")
        if args.decode == 0:
            names = [(n, "both") if r == "prefill" else (n, r) for n, r in names]
        if args.encode < 0 or (args.encode and args.engine == "sim"):
            raise UserError("--encode must be 0 or more, and encode workers need the torch engine")
        if args.encode and vision_config_of(resolve(args.model)) is None:
            raise UserError("--encode needs a model that takes images (a LLaVA-style Hugging Face directory)")
        encoders = [(f"encode-{i}", "encode") for i in range(args.encode)]
        tools = prometheus.ensure() if args.prometheus else None  # before the workers: a build wants both cores
        # Fixed metrics ports, so that a restarted worker is scraped where it was.
        scraped = [free_port() for _ in names] if args.prometheus else []
        encoder_metrics = [free_port() for _ in encoders] if args.prometheus else []
        _say(f"starting {len(names) + len(encoders)} workers ({args.prefill} prefill, {args.decode} decode"
             f"{f', {args.encode} encode' if encoders else ''}); loading the model ...")
        pools: autoscale.LocalPools | None = None
        if args.autoscale:
            pools = autoscale.LocalPools(
                stack, lambda role, metrics_port: [*worker_argv(str(role)), "--metrics-port", str(metrics_port)],
                {Role.PREFILL: autoscale.Bounds(args.min_prefill, args.max_prefill),
                 Role.DECODE: autoscale.Bounds(args.min_decode, args.max_decode)},
                stack.tmp / "workers.txt", stack.tmp / "worker-targets.json", _say)
            workers = [pools.add(Role(role)).child for _, role in names]
            scraped = [pools.workers[child.name].metrics_port for child in workers]
        else:
            workers = [stack.spawn(name, [*worker_argv(role), *(["--metrics-port", str(scraped[i])] if scraped
                                                                else [])])
                       for i, (name, role) in enumerate(names)]
        encode_children = [stack.spawn(name, [*worker_argv(role), *(["--metrics-port", str(encoder_metrics[i])]
                                                                    if encoder_metrics else [])])
                           for i, (name, role) in enumerate(encoders)]
        endpoints = []
        for child in [*workers, *encode_children]:
            port = stack.wait_ready(child, deadline)
            endpoints.append(f"127.0.0.1:{port}")
            _say(f"{child.name} ready on 127.0.0.1:{port}")
        if pools is not None:
            for child, endpoint in zip(workers, endpoints, strict=False):
                pools.workers[child.name].endpoint = endpoint
            pools.fixed_endpoints = endpoints[len(workers):]
            pools.fixed_targets = [f"127.0.0.1:{p}" for p in encoder_metrics]
            pools.publish()
            discovery = ["--discovery", "file", "--workers-file", str(pools.workers_file)]
        else:
            discovery = ["--workers", ",".join(endpoints)]
        router_args = [*described.router_args(), *discovery, "--port", str(args.port),
                       *secured.get(Identity.ROUTER, [])]
        if key_file is not None:
            router_args += ["--api-key-file", str(key_file)]
        port = stack.wait_ready(stack.spawn("router", router_args), deadline)
        metrics = None
        if args.role_switching:
            following = ["--workers-file", discovery[-1]] if pools is not None else discovery
            metrics = stack.wait_ready(stack.spawn("balancer", ["balancer", *following, "--port", "0",
                                                                *balancer.policy_argv(args),
                                                                *secured.get(Identity.CONTROL, [])]), deadline)
            _say(f"role balancer running (TTFT {args.ttft_slo:g} s, TPOT {args.tpot_slo:g} s; metrics on "
                 f"127.0.0.1:{metrics})")
        url = f"http://127.0.0.1:{port}"
        model = _wait_ready(url, deadline)
        planner_metrics: PlannerMetrics | None = None
        if args.prometheus:
            jobs = {"router": [f"127.0.0.1:{port}"], "worker": [f"127.0.0.1:{p}" for p in scraped + encoder_metrics],
                    "balancer": [f"127.0.0.1:{metrics}"] if metrics else []}
            files = {}
            if pools is not None:  # workers come and go: Prometheus follows the planner's target file
                files["worker"] = pools.targets_file
                jobs.pop("worker")
                registry = CollectorRegistry()
                planner_metrics = PlannerMetrics(registry)
                planner_server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
                jobs["planner"] = [f"127.0.0.1:{planner_server.server_port}"]
            config = prometheus.scrape_config(jobs, labels=prometheus.LOCAL_LABELS, target_files=files)
            # The SLO's recording rules and burn-rate alerts, as the operator writes them for a deployment.
            rules = stack.tmp / "slo-rules.yaml"
            assert slo_spec is not None  # set with args.prometheus
            rules.write_text(json.dumps({"groups": slo_rules.groups(labels.LOCAL_NAME, labels.LOCAL_NAMESPACE,
                                                                    slo_spec)}))
            config["rule_files"] = [str(rules)]
            server = prometheus.Prometheus(config, port=args.prometheus_port, tools=tools,
                                           workdir=stack.tmp / "prometheus")
            server.start(timeout_s=max(10.0, deadline - time.monotonic()))
            _say(f"prometheus on {server.url} (scraping the router, {len(scraped)} workers"
                 f"{' and the balancer' if metrics else ''} every second; SLO rules of deployment "
                 f"{labels.LOCAL_DEPLOYMENT})")
        auth = "    -H \"Authorization: Bearer $TRIPHASE_API_KEY\" \\\n" if key_file else ""
        sys.stdout.write(
            f"\ntriphase is serving {model} at {url}/v1  (logs: {stack.tmp})\n\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n{auth}"
            f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
            "Ctrl-C stops everything.\n")
        sys.stdout.flush()
        if pools is not None and server is not None:
            slo, _ = balancer.settings_from(args)
            settings = planner.Settings(stabilization_s=args.stabilization, role_switching=args.role_switching)
            reader = signals.PrometheusSignals(signals.http_query(server.url), "", slo, args.slo_percentile,
                                               args.planner_interval)
            plans = planner.Planner(slo, settings)
            plans.use_profile(Profile.load(pathlib.Path(args.planner_profile)) if args.planner_profile else None)
            autoscale.start_planner(plans, reader, pools, args.planner_interval, planner_metrics)
            _say(f"planner running every {args.planner_interval:g} s (prefill {args.min_prefill}..{args.max_prefill}, "
                 f"decode {args.min_decode}..{args.max_decode} workers)")
        stack.supervise(tick=pools.apply if pools is not None else None)
        return 0
    except KeyboardInterrupt:
        _say("stopping")
        return 0
    finally:
        stack.stop(grace_s=args.drain_timeout + 5)
        if server is not None:
            server.stop()


def _slo_spec(args: argparse.Namespace) -> Slo:
    try:
        return Slo(ttft_seconds=args.ttft_slo, tpot_seconds=args.tpot_slo, percentile=args.slo_percentile)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = {"ttft_seconds": "--ttft-slo", "tpot_seconds": "--tpot-slo", "percentile": "--slo-percentile"}
        raise UserError(f"{flag.get(str(error['loc'][0]), error['loc'][0])}: {error['msg']}") from None


def _check_autoscaling(args: argparse.Namespace) -> None:
    if args.prefill < 1 or args.decode < 1:
        raise UserError("--autoscale needs a prefill and a decode pool (--prefill and --decode at least 1)")
    for role in ("prefill", "decode"):
        low, high, start = getattr(args, f"min_{role}"), getattr(args, f"max_{role}"), getattr(args, role)
        if not 1 <= low <= start <= high:
            raise UserError(f"--min-{role} {low} <= --{role} {start} <= --max-{role} {high} must hold, from 1")
    if not (args.planner_interval >= 1 and args.stabilization >= 0 and 50 <= args.slo_percentile < 100):
        raise UserError("--planner-interval must be at least 1 s, --stabilization not negative and "
                        "--slo-percentile in [50, 100)")
    balancer.settings_from(args)  # the SLO targets
    if args.planner_profile:
        Profile.load(pathlib.Path(args.planner_profile))  # a bad file is a one-line error before anything starts


def _api_key_file(args: argparse.Namespace, tmp: pathlib.Path) -> pathlib.Path | None:
    """The router's key file: --api-key-file, or the --api-key keys written to one only its owner reads."""
    if args.api_key and args.api_key_file:
        raise UserError("--api-key and --api-key-file: choose one")
    if args.api_key_file:
        api_keys.ApiKeys(args.api_key_file)  # a bad file is a one-line error before anything starts
        return pathlib.Path(args.api_key_file)
    if not args.api_key:
        return None
    path = tmp / "api-keys"
    path.touch(mode=0o600)
    path.write_text("".join(f"{key}\n" for key in args.api_key))
    api_keys.ApiKeys(path)
    return path


def _wait_ready(url: str, deadline: float) -> str:
    """The served model's name, once the router is ready."""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return str(json.load(response)["model"])
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)  # polling the router's readiness, bounded by the deadline
    raise UserError("the router did not become ready in time")
