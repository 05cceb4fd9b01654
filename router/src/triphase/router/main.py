"""`triphase router`: the OpenAI-compatible front end over a static list of workers, the list in a file
it follows (`triphase up --autoscale` rewrites it), or the worker pods Kubernetes discovery finds.

SIGTERM: /readyz answers 503 at once, the router keeps serving for `--shutdown-delay` seconds while
endpoints update, then stops accepting connections and gives in-flight requests `--drain-timeout`
seconds to finish before it exits."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import pathlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from triphase.common import images, labels
from triphase.common.errors import UserError
from triphase.common.process.signals import wait_for_stop_signal
from triphase.common.security import mtls

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", help="comma-separated worker endpoints host:port (static discovery)")
    parser.add_argument("--discovery", choices=["static", "file", "kubernetes"], default="static",
                        help="file: follow --workers-file (one host:port per line); kubernetes: watch the worker "
                             "pods selected by --selector in --namespace")
    parser.add_argument("--workers-file", help="file discovery: the file to follow")
    parser.add_argument("--namespace", help="kubernetes discovery: namespace (default: the router's own, or the "
                                            "kubeconfig context's)")
    parser.add_argument("--selector", default=labels.WORKER_SELECTOR,
                        help="kubernetes discovery: label selector of the worker pods")
    parser.add_argument("--kubeconfig", help="kubernetes discovery: kubeconfig (default: in-cluster, $KUBECONFIG)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", help="the model file or directory the workers serve (for the tokenizer)")
    parser.add_argument("--tokenizer", help="a tokenizer.json, a directory with one, or a GGUF file whose tokenizer "
                                            "replaces the model's own (give the workers the same)")
    parser.add_argument("--served-model-name", help="the `model` clients send and every series' `model` label "
                                                    "(default: the file's name; give the workers the same)")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-in-flight", type=int, default=256, help="requests running at once")
    parser.add_argument("--max-queued", type=int, default=1024,
                        help="requests waiting for a running slot; beyond this, 429 with Retry-After")
    parser.add_argument("--max-queue-wait", type=float, default=30.0,
                        help="seconds a request may wait in the queue before a 429")
    parser.add_argument("--routing-policy", choices=["kv-aware", "least-loaded", "round-robin"], default="kv-aware",
                        help="where requests go: prefix-cache overlap against load (kv-aware), the least loaded "
                             "workers, or each worker in turn (router/policy/routing.py)")
    parser.add_argument("--placement-wait", type=float, default=30.0,
                        help="seconds a request may wait for a worker to (re)appear before a 503")
    parser.add_argument("--max-body-bytes", type=int,
                        help="largest request body (413 beyond; default 2 MiB, plus room for the images a request "
                             "may carry when the model takes images)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request body may take to arrive (408 beyond)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a request's head may take to arrive from its first byte (408 beyond)")
    parser.add_argument("--max-connections", type=int, default=4096,
                        help="open client connections; beyond this a new one is answered 503 and closed")
    parser.add_argument("--shutdown-delay", type=float, default=0.0,
                        help="on SIGTERM: seconds to keep serving with /readyz 503 while endpoints update")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM: seconds in-flight requests may take to finish")
    parser.add_argument("--rebalance-gap", type=int, default=4, metavar="STREAMS",
                        help="move running streams off a decode worker that has this many more than another "
                             "(it hands them over; they resume on the less loaded one); 0: never")
    parser.add_argument("--ready-file", help="write the bound port here once serving")
    parser.add_argument("--api-key-file", type=pathlib.Path,
                        help="clients must send one of the keys in this file (`KEY` or `NAME KEY` per line) as "
                             "`Authorization: Bearer KEY`; re-read when it changes (default: no keys)")
    parser.add_argument("--tls-cert", type=pathlib.Path, help="serve the API over HTTPS with this certificate "
                                                                "(PEM chain; reloaded when it changes)")
    parser.add_argument("--tls-key", type=pathlib.Path, help="the certificate's private key (PEM)")
    parser.add_argument("--internal-port", type=int,
                        help="serve /readyz (which lists the workers) and /metrics here instead of on --port "
                             "(0 picks a free port; written to READY_FILE.internal)")
    parser.add_argument("--internal-host", default="127.0.0.1", help="the address of --internal-port")
    mtls.add_argument(parser)
    images.add_arguments(parser)
    parser.add_argument("--image-dir", type=pathlib.Path,
                        help="image_url may name files under this directory (default: no local files)")
    parser.add_argument("--image-fetch", action="store_true",
                        help="fetch http(s) image URLs (off by default: the router would reach any address a "
                             "client names); bounded by --image-max-bytes and --image-fetch-timeout")
    parser.add_argument("--image-fetch-timeout", type=float, default=10.0, metavar="SECONDS")


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket with TCP_NODELAY, which accepted connections inherit (no Nagle delay on
    streamed tokens)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


Follow = Callable[[Callable[[list[str]], None]], Coroutine[Any, Any, None]]


@dataclasses.dataclass
class RunningRouter:
    """A router serving in this process's event loop (`triphase router`, a Ray Serve ingress replica)."""

    api: Any
    port: int
    runner: Any
    registry: Any
    client: Any
    internal: Any = None
    internal_port: int | None = None
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)

    async def stop(self, *, delay_s: float = 0.0) -> None:
        """/readyz 503 at once, `delay_s` of serving on, then in-flight requests get the drain timeout."""
        self.api.draining = True
        if delay_s > 0:
            await asyncio.sleep(delay_s)  # endpoint propagation: load balancers stop sending here
        await self.runner.cleanup()  # stops accepting, waits up to drain_timeout for in-flight handlers
        if self.internal is not None:
            await self.internal.cleanup()
        for task in self.tasks:
            task.cancel()
        await self.registry.stop()
        await self.client.close()


async def _serve(args: argparse.Namespace) -> int:
    router = await start(args)
    if args.ready_file:
        if router.internal_port is not None:
            pathlib.Path(args.ready_file + ".internal").write_text(str(router.internal_port))
        pathlib.Path(args.ready_file).write_text(str(router.port))
    await wait_for_stop_signal()
    logger.info("Router stopping: /readyz is 503; in-flight requests have %.0f s", args.shutdown_delay +
                args.drain_timeout)
    await router.stop(delay_s=args.shutdown_delay)
    return 0


async def start(args: argparse.Namespace, follow: Follow | None = None) -> RunningRouter:
    """Serve the API on args.host:args.port until `RunningRouter.stop`. `follow`: a discovery of the
    caller's own (the Ray application's), called with the registry's `set_endpoints`; else --discovery."""
    from aiohttp import web

    from triphase.common.models.files import load_tokenizer, resolve, served_name
    from triphase.common.models.vision import vision_config_of
    from triphase.common.security.pki import Identity
    from triphase.router.admission import Admission
    from triphase.router.api_keys import ApiKeys
    from triphase.router.connections import ConnectionLimits, GuardedSite
    from triphase.router.metrics import RouterMetrics
    from triphase.router.openai.images import ImageSources
    from triphase.router.openai.routes import Api
    from triphase.router.pipeline import Budgets, Pipeline
    from triphase.router.policy.routing import POLICIES
    from triphase.router.registry import Registry
    from triphase.router.tls import ServerTls
    from triphase.router.worker_client import WorkerClient

    if follow is None and args.discovery == "static" and not args.workers:
        raise UserError("--workers is required with static discovery (or use --discovery kubernetes)")
    if (args.discovery == "file") != bool(args.workers_file):
        raise UserError("--workers-file goes with --discovery file, and file discovery needs it")
    image_limits = images.limits_from_args(args)
    if args.image_dir is not None and not args.image_dir.is_dir():
        raise UserError(f"--image-dir {args.image_dir} is not a directory")
    if not 0 < args.image_fetch_timeout <= 300:
        raise UserError("--image-fetch-timeout must be in (0, 300] seconds")
    path = resolve(args.model)
    vision = vision_config_of(path)
    if args.max_body_bytes is None:
        room = image_limits.max_images * (image_limits.max_base64_chars + 64) if vision else 0
        args.max_body_bytes = (2 << 20) + room
    if args.max_body_bytes < 1024 or args.max_connections < 1:
        raise UserError("--max-body-bytes must be at least 1024 and --max-connections at least 1")
    if args.rebalance_gap < 0 or args.rebalance_gap == 1:
        raise UserError("--rebalance-gap must be 0 (off) or at least 2")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    api_keys = ApiKeys(args.api_key_file) if args.api_key_file else None
    tls = ServerTls(args.tls_cert, args.tls_key) if args.tls_cert else None
    bundle = mtls.from_args(args, Identity.ROUTER)
    tokenizer, _ = load_tokenizer(path, args.tokenizer)
    model = args.served_model_name or served_name(path)
    endpoints = [e.strip() for e in (args.workers or "").split(",") if e.strip()]
    client = WorkerClient(bundle=bundle)
    registry = Registry(client, endpoints)
    registry.start()
    discovery: asyncio.Task[None] | None = None
    if follow is not None:
        discovery = asyncio.create_task(follow(registry.set_endpoints))
    elif args.discovery == "file":
        from triphase.common.process import endpoints_file

        discovery = asyncio.create_task(endpoints_file.follow(pathlib.Path(args.workers_file), registry.set_endpoints))
        logger.info("Discovering workers: following %s", args.workers_file)
    elif args.discovery == "kubernetes":
        from triphase.common.k8s.client import KubeAccess
        from triphase.router.kube_discovery import PodWatcher

        access = KubeAccess.load(args.kubeconfig)
        namespace = args.namespace or access.namespace
        watcher = PodWatcher(access, namespace, args.selector, registry.set_endpoints)
        discovery = asyncio.create_task(watcher.run())
        logger.info("Discovering workers: pods %s in namespace %s", args.selector, namespace)
    metrics = RouterMetrics(model)
    pipeline = Pipeline(registry, client, metrics, budgets=Budgets(placement_wait_s=args.placement_wait),
                        policy=POLICIES[args.routing_policy],
                        prefix_salt=bundle.prefix_salt if bundle is not None else b"")
    balancing: asyncio.Task[None] | None = None
    if args.rebalance_gap:
        from triphase.router.stream_balance import StreamBalancer

        balancing = asyncio.create_task(StreamBalancer(registry, client, metrics, min_gap=args.rebalance_gap).run())
    api = Api(pipeline, tokenizer, metrics, model=model, max_model_len=args.max_model_len,
              admission=Admission(args.max_in_flight, args.max_queued, args.max_queue_wait),
              max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout, vision=vision,
              image_sources=ImageSources(image_limits, args.image_dir, args.image_fetch, args.image_fetch_timeout),
              api_keys=api_keys, drain_timeout_s=args.drain_timeout)
    separate = args.internal_port is not None
    runner = web.AppRunner(api.app(internal=not separate), handler_cancellation=True, access_log=None,
                           shutdown_timeout=args.drain_timeout, keepalive_timeout=75)
    await runner.setup()
    sock = listening_socket(args.host, args.port)
    limits = ConnectionLimits(args.max_connections, args.header_timeout, args.body_timeout)
    await GuardedSite(runner, sock, limits, ssl_context=tls.context if tls else None).start()
    port = sock.getsockname()[1]
    internal: web.AppRunner | None = None
    internal_port: int | None = None
    if separate:
        internal = web.AppRunner(api.internal_app(), access_log=None)
        await internal.setup()
        internal_sock = listening_socket(args.internal_host, args.internal_port)
        await web.SockSite(internal, internal_sock).start()
        internal_port = internal_sock.getsockname()[1]
        logger.info("Router /readyz and /metrics on http://%s:%d", args.internal_host, internal_port)
    following = asyncio.create_task(tls.follow()) if tls else None
    # What startup made (modules, the tokenizer, the app) lives as long as the process: full garbage
    # collections while serving skip it (measured: ~60 ms per collection otherwise, one every ~1000 requests).
    gc.freeze()
    logger.info("Router serving %s on %s://%s:%d (%s; workers over %s)", model, "https" if tls else "http", args.host,
                port, f"{len(api_keys)} API keys" if api_keys else "no API keys",
                "mTLS" if bundle is not None else "plaintext")
    tasks = [task for task in (following, discovery, balancing) if task is not None]
    return RunningRouter(api, port, runner, registry, client, internal, internal_port, tasks)
