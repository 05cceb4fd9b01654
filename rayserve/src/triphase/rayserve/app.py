"""The Serve application: three deployments over the same worker, router and control-loop code the
other runtimes run.

  Control   1 replica: the directory of worker replicas (directory.py) and, with role switching, the
            role balancer (control/) over them, as `triphase up` and the operator run it.
  Worker    N replicas, each one `triphase worker` in the replica's event loop (workers/main.py
            `start`): the engine, its gRPC WorkerService, NIXL. Which role a replica serves is its
            state, not its deployment: the directory gives a new one its first role and the balancer
            switches it at runtime (SetRole), so the split follows the load without a restart.
  Ingress   the OpenAI API: the router (router/main.py `start`) in the replica, Serve's HTTP requests
            forwarded to it over loopback (proxy.py).

Transport. The router reaches workers over the worker gRPC contract, not Serve handles: it picks the
worker itself (KV-aware placement, the prefill -> decode hand-off, failover and migration of a stream
to another worker), which a handle's own load balancing would undo, and per-token streaming through
handles would cost a Ray task reply per token. KV moves worker to worker with NIXL (gRPC fallback),
with the same tickets and mTLS as elsewhere; Serve handles carry only the control traffic (joining
the directory, heartbeats, discovery).

Certificates. With `mtls` (default) `build` makes a CA and one bundle per identity, as `triphase up`
does, and binds each deployment its own; they reach the replicas with the deployment's arguments
(over Ray's RPC: enable Ray's TLS where its network is not trusted).

Shutdown. Serve calls each replica's `__del__`: a worker leaves the directory, turns NOT_SERVING and
drains (in-flight streams finish within `drain_timeout_seconds`, the rest are handed over to other
workers, as on SIGTERM); the ingress stops taking requests and lets in-flight ones finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pathlib
import tempfile
import time
from typing import Any, cast

from ray import serve
from starlette.requests import Request
from starlette.responses import StreamingResponse

from triphase.common.roles import Role
from triphase.common.security import mtls, pki
from triphase.rayserve.config import AppArgs
from triphase.rayserve.directory import HEARTBEAT_S, Directory

logger = logging.getLogger(__name__)

DISCOVERY_S = 1.0  # how often the ingress asks the directory for the workers' endpoints
CONTROL_CALL_S = 5.0  # the longest a call to the control replica may take (it answers from memory)


def _bind_host(args: AppArgs) -> str:
    if args.bind_host:
        return args.bind_host
    import ray

    return str(ray.util.get_node_ip_address())


def _bundle_dir(files: dict[str, bytes] | None) -> list[str]:
    """--mtls-dir of a bundle written where only this process's user reads it."""
    if not files:
        return []
    directory = pathlib.Path(tempfile.mkdtemp(prefix="triphase-mtls-"))
    return ["--mtls-dir", str(mtls.write_bundle(directory / "bundle", files))]


def _parse(add_arguments: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"triphase {argv[0]}", exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(argv[1:])


def _replica_id() -> str:
    return str(serve.get_replica_context().replica_id.unique_id)


class Control:
    """Every method is a coroutine: Serve runs those on the replica's event loop, where the balancer's
    tasks live (it would run plain methods on a thread pool)."""

    async def __init__(self, args: dict[str, Any], bundle: dict[str, bytes] | None) -> None:  # type: ignore[misc]
        self.args = AppArgs.parse(args)
        self.directory = Directory(self.args.prefill_share, alone_serves_both=self.args.min_workers == 1)
        self.balancer: Any = None  # control/runner.py RunningBalancer, with role switching
        if self.args.role_switching.enabled:
            await self._start_balancer(bundle)

    async def _start_balancer(self, files: dict[str, bytes] | None) -> None:
        from triphase.control.balancer import Settings, Slo
        from triphase.control.runner import start_balancer

        switching, slo = self.args.role_switching, self.args.slo
        self.balancer = start_balancer(Slo(slo.ttft_seconds, slo.tpot_seconds),
                                       Settings(max_switches_per_minute=switching.max_switches_per_minute,
                                                min_per_role=switching.min_per_role,
                                                cooldown_s=switching.cooldown_seconds),
                                       switching.grace_seconds, mtls.Bundle.from_files(files) if files else None)

    def _roles_now(self) -> dict[str, Role | None]:
        """By endpoint, the role each worker reports now; None for one whose stats stream broke."""
        if self.balancer is None:
            return {}
        return {endpoint: view.role if view.healthy else None
                for endpoint, view in self.balancer.watcher.views.items()}

    def _changed(self) -> None:
        if self.balancer is not None:
            self.balancer.set_endpoints(self.directory.endpoints(time.monotonic()))

    async def join(self, replica: str) -> str:
        role = self.directory.join(replica, time.monotonic(), self._roles_now())
        logger.info("Worker replica %s joins as %s", replica, role)
        return role.value

    async def beat(self, replica: str, endpoint: str | None, metrics_port: int | None, pid: int) -> None:
        known = self.directory.beat(replica, time.monotonic())
        if endpoint and not (known and self.directory.members[replica].endpoint == endpoint):
            self.directory.register(replica, endpoint, metrics_port, pid, time.monotonic())
            self._changed()

    async def leave(self, replica: str) -> None:
        self.directory.leave(replica)
        self._changed()

    async def endpoints(self) -> list[str]:
        if self.directory.expire(time.monotonic()):  # a replica gone without leaving: the balancer forgets it
            self._changed()
        return self.directory.endpoints(time.monotonic())

    async def workers(self) -> list[dict[str, Any]]:
        """Every registered worker: replica, endpoint, metrics port, pid, first role and the role it serves now."""
        self.directory.expire(time.monotonic())
        now = self._roles_now()
        return [{"replica": m.replica, "endpoint": m.endpoint, "metrics_port": m.metrics_port, "pid": m.pid,
                 "joined_as": m.role.value, "role": (now.get(m.endpoint or "") or m.role).value}
                for m in self.directory.members.values()]

    async def switches(self) -> int:
        return int(self.balancer.loop.completed) if self.balancer is not None else 0

    async def __del__(self) -> None:
        if self.balancer is not None:
            await self.balancer.stop()


class Worker:
    async def __init__(self, args: dict[str, Any], control: Any,  # type: ignore[misc]
                       bundle: dict[str, bytes] | None) -> None:
        from triphase.common import images
        from triphase.workers import main as worker_main
        from triphase.workers.lifecycle import monitor

        self.args = AppArgs.parse(args)
        self.control = control
        self.replica = _replica_id()
        self.worker: Any = None
        role = await control.join.remote(self.replica)
        self.beating = asyncio.create_task(self._beat())  # also while the model loads
        host = _bind_host(self.args)
        argv = [*self.args.stack().worker_args(role, self.args.engine()), "--host", host, "--port", "0",
                "--metrics-port", "0", "--worker-id", f"ray-{self.replica}", *_bundle_dir(bundle)]
        ns = _parse(worker_main.add_arguments, argv)
        limits = images.limits_from_args(ns)
        worker_bundle = mtls.from_args(ns, pki.Identity.WORKER)
        engine = await asyncio.to_thread(worker_main.engine_from_args, ns,
                                         worker_bundle.prefix_salt if worker_bundle is not None else b"")
        self.worker = await worker_main.start(ns, engine, limits, worker_bundle)
        self.watchdog = asyncio.create_task(monitor(self.worker.servicer))
        await self._announce()
        logger.info("Worker replica %s serving on %s as %s", self.replica, self.worker.endpoint, role)

    async def _announce(self) -> None:
        serving = self.worker is not None and not self.worker.servicer.draining
        await asyncio.wait_for(self.control.beat.remote(self.replica, self.worker.endpoint if serving else None,
                                                        self.worker.metrics_port if serving else None, os.getpid()),
                               CONTROL_CALL_S)

    async def _beat(self) -> None:
        while True:
            try:
                await self._announce()
            except Exception:  # the control replica restarting: the next beat registers again
                logger.warning("Heartbeat to the directory failed", exc_info=True)
            await asyncio.sleep(HEARTBEAT_S)

    def check_health(self) -> None:
        """Serve restarts a replica whose engine died (as Kubernetes restarts the pod)."""
        if self.watchdog.done():
            raise RuntimeError(f"engine {self.watchdog.result()}")

    def role(self) -> str:
        return str(self.worker.servicer.role)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the autoscaling policy (autoscaling.py) plans from: this worker's WatchStats figures."""
        from triphase.rayserve.autoscaling import worker_stats

        return worker_stats(self.worker.servicer.stats_pb()) if self.worker is not None else {}

    async def __del__(self) -> None:
        self.beating.cancel()
        # Bounded: when the whole application is deleted the control replica may be gone already, and a
        # handle call to a deployment without replicas waits for one.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.control.leave.remote(self.replica), CONTROL_CALL_S)
        if self.worker is not None:
            self.watchdog.cancel()
            logger.info("Worker replica %s stopping: draining for up to %.0f s", self.replica,
                        self.args.drain_timeout_seconds)
            await self.worker.stop(delay_s=0, grace_s=self.args.drain_timeout_seconds)


class Ingress:
    async def __init__(self, args: dict[str, Any], control: Any,  # type: ignore[misc]
                       bundle: dict[str, bytes] | None, workers: Any = None) -> None:
        from triphase.rayserve.proxy import Forwarder
        from triphase.router import main as router_main

        self.args = AppArgs.parse(args)
        self.control = control
        argv = [*self.args.stack().router_args(), "--host", "127.0.0.1", "--port", "0", *_bundle_dir(bundle)]
        self.router = await router_main.start(_parse(router_main.add_arguments, argv), follow=self._follow)
        self.forwarder = Forwarder(self.router.port)

    async def _follow(self, set_endpoints: Any) -> None:
        while True:
            try:
                set_endpoints(await asyncio.wait_for(self.control.endpoints.remote(), CONTROL_CALL_S))
            except Exception:
                logger.warning("Worker discovery through the directory failed", exc_info=True)
            await asyncio.sleep(DISCOVERY_S)

    async def __call__(self, request: Request) -> StreamingResponse:
        status, headers, chunks = await self.forwarder.forward(
            request.method, request.url.path, request.url.query, list(request.headers.items()),
            await request.body())
        return StreamingResponse(chunks, status_code=status, headers=dict(headers))

    async def __del__(self) -> None:
        await self.router.stop()
        await self.forwarder.close()


def _deployment(cls: type) -> Any:
    return cast(Any, serve.deployment)(cls)  # its overloads do not cover a class with an async __init__


def build(args: dict[str, Any] | None) -> Any:
    """The application `triphase.rayserve:build_app` names: Ingress(Control, Workers)."""
    app = AppArgs.parse(args)
    raw = app.model_dump(mode="json")
    bundles: dict[pki.Identity, dict[str, bytes] | None] = dict.fromkeys(pki.Identity)
    if app.mtls:
        ca, ticket_key, salt = pki.new_ca("triphase-ray"), pki.new_secret(), pki.new_secret()
        bundles = {identity: mtls.component_files(ca, identity, ticket_key=ticket_key, prefix_salt=salt)
                   for identity in pki.Identity}
    control = _deployment(Control).options(name="Control", num_replicas=1, **app.options("control")) \
        .bind(raw, bundles[pki.Identity.CONTROL])
    workers = _deployment(Worker).options(name="Worker", **app.options("worker")) \
        .bind(raw, control, bundles[pki.Identity.WORKER])
    # The ingress is bound the workers' handle only so that Serve deploys them with the application.
    return _deployment(Ingress).options(name="Ingress", **app.options("ingress")) \
        .bind(raw, control, bundles[pki.Identity.ROUTER], workers)
