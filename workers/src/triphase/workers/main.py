"""`triphase worker`: load the engine, serve WorkerService on host:port until SIGTERM or Ctrl-C.

SIGTERM drains gracefully (lifecycle.shutdown) and exits 0; an engine that dies makes the process
exit 1 so that its supervisor (Kubernetes, `triphase up`) starts a fresh one.

Only `run` imports the engine, gRPC and torch, so building the CLI parser stays instant."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import pathlib
import socket
import sys
from typing import Any

from triphase.common import images
from triphase.common.errors import UserError
from triphase.common.images import ImageLimits
from triphase.common.models.files import FORMATS, check_format, resolve, served_name
from triphase.common.process.signals import wait_for_stop_signal
from triphase.common.roles import Role
from triphase.common.security import mtls
from triphase.common.security.pki import Identity
from triphase.workers.engine.device import DEFAULT_CPU_KV_MIB, DEVICE_CHOICES, check_fraction, parse_device

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", default="both", choices=[r.value for r in Role],
                        help="what this worker does (changeable at runtime with SetRole); encode needs a model "
                             "that takes images")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    parser.add_argument("--advertise-host", default=os.environ.get("POD_IP"),
                        help="the address peers reach this worker by, which its KV tickets name (default: $POD_IP, "
                             "else --host, else this host's name when --host is a wildcard)")
    parser.add_argument("--health-port", type=int,
                        help="also serve gRPC health checking alone, in plaintext, on this port (for probes, "
                             "which present no certificate, when --mtls-dir is set; 0 picks a free port, written "
                             "to READY_FILE.health)")
    mtls.add_argument(parser)
    parser.add_argument("--worker-id", help="default: HOSTNAME:PORT")
    parser.add_argument("--served-model-name",
                        help="the model's name in stats and every series' `model` label (default: the file's name, "
                             "as the router derives it; give both the same)")
    add_engine_arguments(parser)
    parser.add_argument("--kv-pin-timeout", type=float, default=30.0,
                        help="seconds before prefilled KV nobody read is freed")
    parser.add_argument("--kv-transfer", default="nixl", choices=["nixl", "grpc"],
                        help="how decode pulls prefilled KV: NIXL READ (gRPC stream if it fails) or gRPC only")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="Prometheus /metrics port (0 picks a free one; default: off)")
    parser.add_argument("--ready-file", help="write the bound port here once serving (for supervisors)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM: seconds in-flight streams may take to finish before they are handed "
                             "over to other workers")
    parser.add_argument("--shutdown-delay", type=float, default=0.0,
                        help="on SIGTERM: seconds NOT_SERVING before draining, for endpoints to update (0 under "
                             "Kubernetes, where the preStop hook waits)")
    parser.add_argument("--stall-timeout", type=float, default=120.0,
                        help="seconds without engine progress, while it has work, before health is NOT_SERVING")
    parser.add_argument("--embedding-cache-mib", type=int, default=256,
                        help="image embeddings kept by content digest (encode workers serve them from here)")
    images.add_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's settings (shared by `triphase worker` and `triphase profile`)."""
    parser.add_argument("--model", help="GGUF file or Hugging Face directory (default: bundled SmolLM2-135M)")
    parser.add_argument("--model-format", choices=FORMATS,
                        help="fail at start unless the model is a GGUF file (gguf) or a directory of safetensors")
    parser.add_argument("--tokenizer", help="a tokenizer.json, a directory with one, or a GGUF file whose tokenizer "
                                            "replaces the model's own (give the router the same)")
    parser.add_argument("--engine", default="torch", choices=["torch", "sim"],
                        help="sim: real scheduling and KV bookkeeping with a timing model instead of the model")
    parser.add_argument("--sim-prefill-ms", type=float, default=10.0, help="sim: fixed cost of a prefill step")
    parser.add_argument("--sim-prefill-per-token-ms", type=float, default=0.0)
    parser.add_argument("--sim-decode-ms", type=float, default=10.0, help="sim: fixed cost of a decode step")
    parser.add_argument("--sim-decode-per-seq-ms", type=float, default=0.0)
    parser.add_argument("--sim-profile", metavar="PATH",
                        help="sim: replay the timing `triphase profile` measured (instead of the --sim-*-ms)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--weights", default="auto", choices=["auto", "dense", "int4"])
    add_device_arguments(parser)
    parser.add_argument("--kv-cache-mib", type=int,
                        help=f"KV cache size (default: {DEFAULT_CPU_KV_MIB} MiB on the CPU; on a GPU, "
                             "--gpu-memory-fraction of what the weights leave free)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512, help="per-step token budget")


def _device(value: str) -> str:
    try:
        return parse_device(value)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(value: str) -> float:
    try:
        return check_fraction(float(value))
    except (UserError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the engine computes (`triphase worker`, `profile`, `generate`, and `up` for its workers)."""
    parser.add_argument("--device", type=_device, default="auto",
                        help=f"{DEVICE_CHOICES}; auto (default): the first visible CUDA device, else the CPU")
    parser.add_argument("--gpu-memory-fraction", type=_fraction, default=0.9,
                        help="on a GPU without --kv-cache-mib: the share of the memory free after the weights "
                             "that the worker may use (KV cache and step buffers); lower it for workers "
                             "sharing a GPU (default 0.9)")


def engine_from_args(args: argparse.Namespace, prefix_salt: bytes = b"") -> Any:
    """The engine `add_engine_arguments` describes (loading the model, with progress, unless sim)."""
    from triphase.workers.engine.core import Engine, EngineConfig
    from triphase.workers.generate import progress_bar

    if args.kv_cache_mib is not None and args.kv_cache_mib < 1:
        raise UserError(f"--kv-cache-mib must be at least 1, got {args.kv_cache_mib}")
    kv_bytes = args.kv_cache_mib << 20 if args.kv_cache_mib is not None else None
    config = EngineConfig(dtype=args.dtype, weights=args.weights, kv_cache_bytes=kv_bytes,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                          prefix_salt=prefix_salt, device=args.device if args.engine == "torch" else "cpu",
                          gpu_memory_fraction=args.gpu_memory_fraction)
    if args.sim_profile and args.engine != "sim":
        raise ValueError("--sim-profile needs --engine sim")
    if args.engine == "sim" and args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: the sim engine computes nothing (use --engine torch)")
    check_format(args.model, args.model_format)
    if args.engine == "sim":
        from triphase.workers.engine.sim import SimTiming, simulated_engine

        if args.sim_profile:
            from triphase.common.profile import Profile

            p = Profile.load(pathlib.Path(args.sim_profile))
            timing = SimTiming(p.prefill_base_s, p.prefill_per_token_s, p.decode_base_s, p.decode_per_seq_s,
                               p.decode_per_context_token_s)
        else:
            timing = SimTiming(args.sim_prefill_ms / 1e3, args.sim_prefill_per_token_ms / 1e3,
                               args.sim_decode_ms / 1e3, args.sim_decode_per_seq_ms / 1e3)
        return simulated_engine(args.model, config, timing, tokenizer_path=args.tokenizer)
    return Engine.from_path(args.model, config, progress=progress_bar(quiet=not sys.stderr.isatty()),
                            tokenizer=args.tokenizer)


def run(args: argparse.Namespace) -> int:
    limits = images.limits_from_args(args)
    if args.embedding_cache_mib < 0:
        raise ValueError("--embedding-cache-mib must be 0 or more")
    bundle = mtls.from_args(args, Identity.WORKER)
    engine = engine_from_args(args, bundle.prefix_salt if bundle is not None else b"")
    if args.role == Role.ENCODE and engine.vision is None:
        raise ValueError("--role encode needs a model that takes images (a LLaVA-style Hugging Face directory)")
    return asyncio.run(_serve(args, engine, limits, bundle))


def advertised_host(args: argparse.Namespace) -> str:
    if args.advertise_host:
        return str(args.advertise_host)
    if args.host not in ("0.0.0.0", "::", ""):
        return str(args.host)
    return socket.gethostbyname(socket.gethostname())


@dataclasses.dataclass
class RunningWorker:
    """A worker serving in this process's event loop (`triphase worker`, a Ray Serve replica)."""

    servicer: Any
    server: Any
    port: int
    runner: Any
    metrics_port: int | None = None

    @property
    def endpoint(self) -> str:
        return str(self.servicer.endpoint)

    async def stop(self, *, delay_s: float, grace_s: float) -> None:
        """NOT_SERVING, `delay_s` for endpoints to update, `grace_s` for in-flight streams to finish,
        then the rest are handed over and everything the worker opened is closed (lifecycle.shutdown)."""
        from triphase.workers.lifecycle import shutdown

        await shutdown(self.servicer, self.server, delay_s=delay_s, grace_s=grace_s)
        if self.servicer.health_server is not None:
            await self.servicer.health_server.stop(grace=None)
        await self.servicer.channels.close()
        self.servicer.images.close()
        await self.runner.stop()


async def start(args: argparse.Namespace, engine: Any, limits: ImageLimits,
                bundle: mtls.Bundle | None) -> RunningWorker:
    """Serve `engine` on args.host:args.port (and metrics, health) until `RunningWorker.stop`."""
    from triphase.workers.engine.async_engine import AsyncEngine
    from triphase.workers.kv.nixl import NixlConnector, NixlUnavailable, bind_ucx
    from triphase.workers.server import WorkerServicer, serve

    runner = AsyncEngine(engine, pin_timeout_s=args.kv_pin_timeout, stall_timeout_s=args.stall_timeout)
    runner.start()
    worker_id = args.worker_id or f"{socket.gethostname()}:{args.port}"
    nixl = None
    if args.kv_transfer == "nixl":
        logger.info("NIXL's UCX listens on %s only", bind_ucx(advertised_host(args)) or "every interface")
        try:
            nixl = NixlConnector(f"triphase-{socket.gethostname()}-{os.getpid()}", engine.runner.kv_cache,
                                 engine.layout)
        except NixlUnavailable as exc:
            logger.warning("KV transfer falls back to the gRPC stream: %s", exc)
    servicer = WorkerServicer(runner, worker_id=worker_id, endpoint="", role=Role(args.role),
                              model=args.served_model_name or served_name(resolve(args.model)), nixl=nixl,
                              image_limits=limits,
                              embedding_cache_bytes=args.embedding_cache_mib << 20, bundle=bundle)
    server, port = await serve(servicer, args.host, args.port, health_port=args.health_port)
    servicer.endpoint = f"{advertised_host(args)}:{port}"
    if not args.worker_id:
        servicer.worker_id = f"{socket.gethostname()}:{port}"
    logger.info("Worker %s serving on %s as %s on %s in %s (%d KV blocks, %.0f MiB; KV transfer %s; %s)",
                servicer.worker_id, servicer.endpoint, servicer.role, engine.device, engine.layout.dtype,
                engine.layout.num_blocks, engine.layout.total_bytes / 2**20,
                f"NIXL from {nixl.memory} ({nixl.backend})" if nixl is not None else "gRPC",
                f"mTLS as {bundle.identity}" if bundle is not None else "plaintext")
    worker = RunningWorker(servicer, server, port, runner)
    if args.metrics_port >= 0:
        from triphase.workers.metrics import serve_metrics

        worker.metrics_port = serve_metrics(servicer, args.host, args.metrics_port)
        logger.info("Worker metrics on http://%s:%d/metrics", args.host, worker.metrics_port)
    return worker


async def _serve(args: argparse.Namespace, engine: Any, limits: ImageLimits, bundle: mtls.Bundle | None) -> int:
    from triphase.workers.lifecycle import monitor

    worker = await start(args, engine, limits, bundle)
    servicer = worker.servicer
    if args.ready_file and worker.metrics_port is not None:
        pathlib.Path(args.ready_file + ".metrics").write_text(str(worker.metrics_port))
    if args.ready_file and servicer.health_server is not None:
        pathlib.Path(args.ready_file + ".health").write_text(str(servicer.health_port))
    if args.ready_file:
        pathlib.Path(args.ready_file).write_text(str(worker.port))
    watchdog = asyncio.create_task(monitor(servicer))
    stop_signal = asyncio.create_task(wait_for_stop_signal())
    await asyncio.wait([watchdog, stop_signal], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if watchdog.done():
        logger.critical("Worker %s exiting to be restarted: %s", servicer.worker_id, watchdog.result())
        code = 1
        stop_signal.cancel()
    else:
        watchdog.cancel()
        logger.info("Worker %s stopping: draining for up to %.0f s", servicer.worker_id,
                    args.shutdown_delay + args.drain_timeout)
    await worker.stop(delay_s=0 if code else args.shutdown_delay, grace_s=0 if code else args.drain_timeout)
    return code
