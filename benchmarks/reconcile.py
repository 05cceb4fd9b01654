"""Operator reconcile latency on the local control plane, one run: `kubectl apply` of 1 and of 100
ServingDeployments -> the moment every child of each exists (ServingPools, Deployments, Service,
ConfigMap, PDBs, router ServiceAccount/Role/RoleBinding), p50/p99; and the operator's peak RSS.

The control plane is `triphase cluster up` in a private state directory; the operator runs as its
least-privilege ServiceAccount. Children are observed by LISTing them from the API every 50 ms.

    python benchmarks/reconcile.py [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import yaml
from report import ROOT, log, update_section
from stack import TRIPHASE, start, stop_all, wait_until

from triphase.operator.cluster import binaries, controlplane

SAMPLE = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2-disaggregated.yaml").read_text())
KINDS = ("servingpools", "deployments", "services", "configmaps", "poddisruptionbudgets", "serviceaccounts",
         "roles", "rolebindings")
CHILDREN = 2 + 3 + 1 + 1 + 3 + 1 + 1 + 1  # per ServingDeployment, as the kinds above


def kubectl(config: pathlib.Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([binaries.ensure(progress=False)["kubectl"], "--kubeconfig", str(config), *args],
                            capture_output=True, text=True, input=stdin, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout


PATHS = {"servingpools": "/apis/triphase.dev/v1alpha1", "deployments": "/apis/apps/v1", "services": "/api/v1",
         "configmaps": "/api/v1", "poddisruptionbudgets": "/apis/policy/v1", "serviceaccounts": "/api/v1",
         "roles": "/apis/rbac.authorization.k8s.io/v1", "rolebindings": "/apis/rbac.authorization.k8s.io/v1"}


def counts(cluster: controlplane.Cluster, namespace: str) -> dict[str, int]:
    """Children per ServingDeployment name (one LIST per kind, straight to the API server)."""
    out: dict[str, int] = {}
    for kind in KINDS:
        url = f"{PATHS[kind]}/namespaces/{namespace}/{kind}?labelSelector=triphase.dev%2Fdeployment"
        items = cluster.api("GET", url)["items"]
        for item in items:
            name = item["metadata"]["labels"]["triphase.dev/deployment"]
            out[name] = out.get(name, 0) + 1
    return out


def run_batch(cluster: controlplane.Cluster, namespace: str, n: int) -> list[float]:
    config = cluster.kubeconfig
    kubectl(config, "create", "namespace", namespace)
    docs = []
    for i in range(n):
        obj = copy.deepcopy(SAMPLE)
        obj["metadata"] = {"name": f"sd-{i:03d}", "namespace": namespace}
        docs.append(obj)
    started = time.perf_counter()
    kubectl(config, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    done: dict[str, float] = {}
    deadline = started + 300
    while len(done) < n and time.perf_counter() < deadline:
        now = time.perf_counter()
        for name, count in counts(cluster, namespace).items():
            if count >= CHILDREN and name not in done:
                done[name] = now - started
        time.sleep(0.05)  # polling interval of a condition with a deadline
    if len(done) < n:
        raise RuntimeError(f"only {len(done)} of {n} ServingDeployments got all their children")
    return sorted(done.values())


def peak_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="reconcile-"))
    state = tmp / "cluster"
    cluster = controlplane.up(state, nodes=8, gpus_per_node=64, progress=True)
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
        ready = tmp / "operator.ready"
        operator = start([*TRIPHASE, "operator", "--standalone", "--liveness", "", "--ready-file", str(ready)],
                         tmp / "operator.log", env={"KUBECONFIG": str(config)})
        procs.append(operator)
        wait_until(ready.exists, 60, "the operator")
        results = {}
        for n in (1, 100):
            log(f"applying {n} ServingDeployment(s)")
            latencies = run_batch(cluster, f"bench-{n}", n)
            results[n] = {"p50": latencies[len(latencies) // 2], "p99": latencies[min(n - 1, int(0.99 * n))],
                          "max": latencies[-1]}
            log(f"  p50 {results[n]['p50']:.2f} s, p99 {results[n]['p99']:.2f} s")
        rss = peak_rss_mib(operator.pid)
    finally:
        stop_all(procs)
        controlplane.down(state, progress=False)
    lines = [
        "## Operator reconcile latency (issue 4)", "",
        "`python benchmarks/reconcile.py` — one run on the local control plane (etcd, kube-apiserver, "
        "controller-manager, scheduler, kwok), 2 cores shared with the operator. Latency = `kubectl apply` of the "
        f"ServingDeployments -> all {CHILDREN} children of each exist (LISTs every 50 ms).", "",
        "| ServingDeployments applied at once | p50 | p99 | slowest |", "|---:|---:|---:|---:|",
    ]
    for n, r in results.items():
        lines.append(f"| {n} | {r['p50']:.2f} s | {r['p99']:.2f} s | {r['max']:.2f} s |")
    p99 = results[100]["p99"]
    lines += ["", f"Target p99 <= 2 s with 100: {p99:.2f} s ({'met' if p99 <= 2 else 'NOT met'}). Operator peak RSS "
                  f"(VmHWM) {rss:.0f} MiB (target <= 250 MB: {'met' if rss * 1.048576 <= 250 else 'NOT met'})."]
    body = "\n".join(lines)
    sys.stdout.write(body + "\n")
    if not args.no_write:
        update_section("reconcile", body)
        log("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
