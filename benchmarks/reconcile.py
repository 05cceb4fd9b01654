"""Operator reconcile latency on the local control plane, one run: `kubectl apply` of 1 and of 100
ServingDeployments -> the moment every child of each exists (ServingPools, Deployments, Service,
ConfigMap, PDBs, router ServiceAccount and RoleBinding), p50/p99; and the operator's peak RSS.

The control plane is `triphase cluster up` in a private state directory; the operator runs as its
least-privilege ServiceAccount. Children are observed with one metadata-only watch per kind. A third
batch pauses the controller manager, scheduler and kwok (SIGSTOP) to show the API server's cost
of the operator's own requests, without the Deployment -> ReplicaSet -> pod cascade.

The floor: the same objects the operator writes for each ServingDeployment (its pools, the CA and
bundle Secrets, every child), server-side applied by a bare client with the operator's concurrency
(every object of every deployment at once, over as many connections as the operator's client keeps)
and observed the same way. The operator's own requests are counted from the API server's audit log
(metadata only; it costs every row the same).

    python benchmarks/reconcile.py [--no-write] [--singles 5] [--many 100]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import aiohttp
import yaml
from report import ROOT, cpu_seconds, log, update_section
from stack import start_triphase, stop_all

from triphase.local.cluster import binaries, controlplane
from triphase.operator import builders, security
from triphase.operator.api.v1alpha1 import ServingDeploymentSpec
from triphase.operator.kube import CONNECTIONS
from triphase.operator.kube import path as api_path

SAMPLE = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2-disaggregated.yaml").read_text())
KINDS = ("servingpools", "deployments", "services", "configmaps", "poddisruptionbudgets", "serviceaccounts",
         "rolebindings")
CHILDREN = 2 + 3 + 1 + 1 + 3 + 1 + 1  # per ServingDeployment, as the kinds above


def kubectl(config: pathlib.Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([binaries.ensure(progress=False)["kubectl"], "--kubeconfig", str(config), *args],
                            capture_output=True, text=True, input=stdin, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout


PATHS = {"servingpools": "/apis/triphase.dev/v1alpha1", "deployments": "/apis/apps/v1", "services": "/api/v1",
         "configmaps": "/api/v1", "poddisruptionbudgets": "/apis/policy/v1", "serviceaccounts": "/api/v1",
         "rolebindings": "/apis/rbac.authorization.k8s.io/v1"}


WATCH_HEADERS = {"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"}  # metadata only


async def run_batch(cluster: controlplane.Cluster, namespace: str, n: int,
                    floor: list[list[dict[str, Any]]] | None = None) -> list[float]:
    """Server-side apply `n` ServingDeployments at once (or, with `floor`, each one's objects as a bare
    client would); one watch per child kind (metadata only) records when each child appears. Returns
    the seconds from the start of the batch to the moment each ServingDeployment had all its
    children, sorted."""
    kubectl(cluster.kubeconfig, "create", "namespace", namespace)
    headers = {"Authorization": f"Bearer {cluster.token}"}
    seen: dict[str, set[tuple[str, str]]] = {}
    done: dict[str, float] = {}
    finished = asyncio.Event()
    started = 0.0

    async def watch(response: aiohttp.ClientResponse, kind: str) -> None:
        async for line in response.content:
            event = json.loads(line)
            if event["type"] != "ADDED":
                continue
            meta = event["object"]["metadata"]
            owner = meta["labels"]["triphase.dev/deployment"]
            seen.setdefault(owner, set()).add((kind, meta["name"]))
            if len(seen[owner]) >= CHILDREN and owner not in done:
                done[owner] = time.perf_counter() - started
                if len(done) == n:
                    finished.set()

    def session(connections: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(cluster.server, headers=headers, timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(ssl=cluster.ssl_context(), limit=connections))

    # The watches hold a connection each; the applies share a few, as a client such as kubectl would
    # (the floor: as many as the operator's client).
    async with session(len(KINDS)) as watching, session(CONNECTIONS if floor else 4) as applying:
        watches = []
        for kind in KINDS:  # each watch is established (response headers received) before the batch starts
            response = await watching.get(f"{PATHS[kind]}/namespaces/{namespace}/{kind}", headers=WATCH_HEADERS,
                                         params={"watch": "1", "labelSelector": "triphase.dev/deployment"})
            response.raise_for_status()
            watches.append(asyncio.ensure_future(watch(response, kind)))

        async def apply(i: int) -> None:
            obj = copy.deepcopy(SAMPLE)
            obj["metadata"] = {"name": f"sd-{i:03d}", "namespace": namespace}
            url = f"/apis/triphase.dev/v1alpha1/namespaces/{namespace}/servingdeployments/sd-{i:03d}"
            async with applying.patch(url, data=json.dumps(obj), params={"fieldManager": "benchmark"},
                                     headers={"Content-Type": "application/apply-patch+yaml"}) as response:
                response.raise_for_status()

        async def write(obj: dict[str, Any]) -> None:
            meta = obj["metadata"]
            url = api_path(obj["apiVersion"], obj["kind"], namespace, meta["name"])
            async with applying.patch(url, data=json.dumps(obj), params={"fieldManager": "floor", "force": "true"},
                                      headers={"Content-Type": "application/apply-patch+yaml"}) as response:
                response.raise_for_status()

        started = time.perf_counter()
        if floor is None:
            await asyncio.gather(*(apply(i) for i in range(n)))
        else:
            await asyncio.gather(*(write(obj) for objects in floor for obj in objects))
        try:
            await asyncio.wait_for(finished.wait(), 300)
        except TimeoutError:
            raise RuntimeError(f"only {len(done)} of {n} ServingDeployments got all their children") from None
        finally:
            for task in watches:
                task.cancel()
    return sorted(done.values())


def floor_objects(namespace: str, n: int) -> list[list[dict[str, Any]]]:
    """What the operator writes for each of `n` ServingDeployments of the sample (made before the clock
    starts: one CA for all, the certificates' cost is the operator's, not the API server's)."""
    spec = ServingDeploymentSpec.model_validate(SAMPLE["spec"])
    authority = security.Authority.new("floor")
    out = []
    for i in range(n):
        name = f"sd-{i:03d}"
        objects = [builders.serving_pool(name, namespace, role, pool, with_replicas=True)
                   for role, pool in builders.pools(spec).items()]
        objects.append(security.ca_secret(name, namespace, authority))
        objects += [security.bundle_secret(name, namespace, identity, authority) for identity in security.SECRETS]
        objects += builders.children(name, namespace, spec, {r: p.replicas for r, p in builders.pools(spec).items()})
        out.append(objects)
    return out


OPERATOR = "system:serviceaccount:triphase-system:triphase-operator"


def operator_requests(audit_log: pathlib.Path) -> collections.Counter[tuple[str, str]]:
    """Completed non-watch requests the operator's ServiceAccount has made so far (the audit log), by
    (namespace, "verb resource[/subresource] code")."""
    count: collections.Counter[tuple[str, str]] = collections.Counter()
    with audit_log.open() as lines:
        for line in lines:
            if OPERATOR in line:
                event = json.loads(line)
                if (event.get("user", {}).get("username") == OPERATOR and event.get("stage") == "ResponseComplete"
                        and event.get("verb") != "watch"):
                    ref = event.get("objectRef") or {}
                    what = "/".join(filter(None, (ref.get("resource"), ref.get("subresource"))))
                    code = (event.get("responseStatus") or {}).get("code")
                    count[ref.get("namespace", ""), f"{event['verb']} {what or event.get('requestURI')} {code}"] += 1
    return count


def settled_operator_requests(audit_log: pathlib.Path, quiet_s: float = 5.0, timeout: float = 120.0
                              ) -> collections.Counter[tuple[str, str]]:
    """operator_requests once the operator has made none for `quiet_s` (its status writes trail the
    children a batch waits for): every batch's requests counted in full, in its own namespace."""
    deadline = time.monotonic() + timeout
    last, since = operator_requests(audit_log), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the operator did not go quiet within {timeout} s")
        time.sleep(0.5)  # polling the audit log for quiet, with a deadline
        now = operator_requests(audit_log)
        if now != last:
            last, since = now, time.monotonic()
    return last


def peak_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


PAUSED = ("kube-controller-manager", "kube-scheduler", "kwok")


def requests_served(cluster: controlplane.Cluster) -> float:
    """Non-watch requests the API server has answered since it started (all clients)."""
    request = urllib.request.Request(cluster.server + "/metrics", headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=10, context=cluster.ssl_context()) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'verb="WATCH"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure(cluster: controlplane.Cluster, operator: int, namespace: str, n: int, *, paused: bool,
            floor: bool = False) -> dict[str, Any]:
    pids = cluster.pids()
    objects = floor_objects(namespace, n) if floor else None
    before = cpu_seconds(operator), cpu_seconds(pids["kube-apiserver"]), requests_served(cluster)
    if paused:  # diagnostic: the API server's work without the Deployment -> pod cascade
        for name in PAUSED:
            os.kill(pids[name], signal.SIGSTOP)
    try:
        latencies = asyncio.run(run_batch(cluster, namespace, n, objects))
    finally:
        if paused:
            for name in PAUSED:
                os.kill(pids[name], signal.SIGCONT)
    return {"latencies": latencies, "operator_cpu": cpu_seconds(operator) - before[0],
            "apiserver_cpu": cpu_seconds(pids["kube-apiserver"]) - before[1],
            "requests": requests_served(cluster) - before[2], "namespaces": [namespace]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--singles", type=int, default=5, help="batches of one ServingDeployment, one after another")
    parser.add_argument("--many", type=int, default=100, help="ServingDeployments in the large batch")
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reconcile-"))
    state = tmp / "cluster"
    cluster = controlplane.up(state, nodes=8, gpus_per_node=64, progress=True, audit_log=state / "audit.log")
    admin = cluster.kubeconfig
    procs = []
    try:
        kubectl(admin, "create", "namespace", "triphase-system")
        kubectl(admin, "apply", "--server-side", "-f", str(ROOT / "deploy" / "crds"))
        kubectl(admin, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        kubectl(admin, "apply", "-f", str(ROOT / "deploy" / "manifests"))
        token = cluster.api("POST", "/api/v1/namespaces/triphase-system/serviceaccounts/triphase-operator/token",
                            {"spec": {"expirationSeconds": 3600}})["status"]["token"]
        config = tmp / "operator.kubeconfig"
        controlplane.write_kubeconfig(config, cluster.server, state / "pki" / "ca.crt", token, user="operator")
        # The resync (every 30 s by default) would add its own requests to a batch's namespace while
        # the run goes on: this measures what making a deployment costs.
        operator, _ = start_triphase(tmp, "operator", ["operator", "--standalone", "--liveness", "",
                                                       "--resync-seconds", "3600"],
                                     env={"KUBECONFIG": str(config)}, timeout=60)
        procs.append(operator)
        log("warm-up: one ServingDeployment, not counted (the operator's watches start)")
        asyncio.run(run_batch(cluster, "warm-up", 1))
        rows = []
        singles = [measure(cluster, operator.pid, f"single-{i}", 1, paused=False) for i in range(args.singles)]
        rows.append((f"1 (x{args.singles}, one after another)", {
            "latencies": sorted(r["latencies"][0] for r in singles),
            **{key: sum(r[key] for r in singles) / len(singles) for key in ("operator_cpu", "apiserver_cpu",
                                                                              "requests")},
            "namespaces": [r["namespaces"][0] for r in singles]}, 1))
        for paused in (False, True):
            log(f"applying {args.many} ServingDeployments at once" + (" (controllers paused)" if paused else ""))
            label = f"{args.many} at once" + (", controller-manager, scheduler and kwok paused" if paused else "")
            rows.append((label, measure(cluster, operator.pid, f"many-{int(paused)}", args.many, paused=paused),
                         args.many))
        log(f"the floor: {args.many} ServingDeployments' objects written by a bare client")
        rows.append((f"{args.many} at once, the floor: their objects written by a bare client",
                     measure(cluster, operator.pid, "floor", args.many, paused=False, floor=True), args.many))
        rss = peak_rss_mib(operator.pid)
        made = settled_operator_requests(state / "audit.log")
        for label, r, n in rows:
            mine: collections.Counter[str] = collections.Counter()
            for (namespace, what), count in made.items():
                if namespace in r["namespaces"]:
                    mine[what] += count
            made_here = len(r["namespaces"]) * n  # ServingDeployments: one per single's namespace, n in a batch's
            r["operator_requests"] = mine.total() / made_here
            r["operator_kinds"] = ", ".join(f"{what} {count / made_here:.1f}" for what, count in mine.most_common())
            log(f"operator requests per ServingDeployment, {label}: {r['operator_kinds']}")
    finally:
        stop_all(procs)
        controlplane.down(state, progress=False)
    lines = [
        "## Operator reconcile latency (issues 4 and 28)", "",
        "`python benchmarks/reconcile.py` — one run on the local control plane (etcd, kube-apiserver, "
        "controller-manager, scheduler, kwok), all on the same 2 cores as the operator. Latency = server-side apply of "
        f"the ServingDeployments (4 connections, as a client would) -> all {CHILDREN} children of each exist "
        "(metadata watches). CPU = seconds used during the batch (per ServingDeployment for the singles); API "
        "requests = every client's (operator, controllers, the benchmark) per ServingDeployment during the batch; "
        "operator requests = its ServiceAccount's in the batch's namespace (the API server's audit log, which every "
        "row pays for), counted once the operator has gone quiet, with the resync set to an hour so that only making "
        "the deployments counts. The floor row writes the "
        "same objects the operator writes, as a bare client with the operator's concurrency (module docstring).", "",
        "| ServingDeployments | p50 | p99 | slowest | operator CPU | API server CPU | API requests / SD "
        "| operator requests / SD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def p99_of(lat: list[float]) -> float:
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))]

    for label, r, n in rows:
        lat = r["latencies"]
        lines.append(f"| {label} | {lat[len(lat) // 2]:.2f} s | {p99_of(lat):.2f} s "
                     f"| {lat[-1]:.2f} s | {r['operator_cpu']:.2f} s | {r['apiserver_cpu']:.2f} s "
                     f"| {r['requests'] / n:.0f} | {r['operator_requests']:.1f} |")
    p99, floor_p99 = p99_of(rows[1][1]["latencies"]), p99_of(rows[-1][1]["latencies"])
    per_sd = rows[1][1]["operator_requests"]
    ratio = p99 / floor_p99
    rss_met = "met" if rss * 1.048576 <= 250 else "NOT met"
    lines += ["", f"Targets with {args.many} at once: operator p99 <= 1.5x the floor's: {p99:.2f} s vs "
                  f"{floor_p99:.2f} s = {ratio:.2f}x ({'met' if ratio <= 1.5 else 'NOT met'}); operator requests per "
                  f"ServingDeployment <= 20: {per_sd:.1f} ({'met' if per_sd <= 20 else 'NOT met'}). Operator peak "
                  f"RSS (VmHWM) {rss:.0f} MiB (target <= 250 MB: {rss_met}).", "",
              f"The operator's requests per ServingDeployment of the batch of {args.many} (verb, resource, HTTP code): "
              f"{rows[1][1]['operator_kinds']}."]
    body = "\n".join(lines)
    sys.stdout.write(body + "\n")
    if not args.no_write:
        update_section("reconcile", body)
        log("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
