"""A local Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok simulating GPU nodes (capacity `nvidia.com/gpu`), so that pods are scheduled
and reach Running without Docker or a kubelet.

State lives in one directory (`<cache>/cluster/<name>` by default): certificates (a CA from openssl,
the apiserver's serving certificate, the service-account signing key), etcd data, logs, the PIDs and
the admin kubeconfig. `up` is idempotent (a running cluster is left alone), `down` stops every
process and removes the state, `status` reports what runs. The admin user authenticates with a
static token in `system:masters`; everything else (the operator under test) uses ServiceAccount
tokens and RBAC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from triphase.common.errors import UserError
from triphase.common.process.net import free_port
from triphase.local import gobuild
from triphase.local.cluster import binaries

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CIDR = "10.96.0.0/16"
STAGES = pathlib.Path(__file__).with_name("kwok-stages.yaml")


def default_state_dir(name: str = "default") -> pathlib.Path:
    return gobuild.cache_root() / "cluster" / name


@dataclasses.dataclass
class Cluster:
    """A control plane's state directory and what it needs to talk to it."""

    state: pathlib.Path

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.state / "kubeconfig"

    @property
    def info_file(self) -> pathlib.Path:
        return self.state / "cluster.json"

    def info(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.info_file.read_text()))
        except (OSError, ValueError):
            return {}

    @property
    def server(self) -> str:
        return str(self.info().get("server", ""))

    @property
    def token(self) -> str:
        return str(self.info().get("token", ""))

    def pids(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.info().get("pids", {}).items()}

    def running(self) -> dict[str, bool]:
        return {name: _alive(pid) for name, pid in self.pids().items()}

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.state / "pki" / "ca.crt"))

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10,
            content_type: str = "application/json") -> Any:
        """One admin request to the API server; returns the decoded JSON body."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()) as response:
            return json.loads(response.read() or b"null")

    def healthy(self) -> bool:
        try:
            request = urllib.request.Request(self.server + "/readyz",
                                             headers={"Authorization": f"Bearer {self.token}"})
            with urllib.request.urlopen(request, timeout=2, context=self.ssl_context()) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        if pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _say(progress: bool, message: str) -> None:
    if progress:
        sys.stderr.write(f"triphase cluster: {message}\n")
        sys.stderr.flush()


def _wait(condition: Callable[[], bool], timeout: float, what: str, logs: pathlib.Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)  # polling interval of a condition with a deadline
    hint = f" (logs: {logs})" if logs else ""
    raise UserError(f"timed out after {timeout:.0f} s waiting for {what}{hint}")


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    if shutil.which("openssl") is None:
        raise UserError("the local cluster needs the `openssl` command to create its certificates")
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


P256 = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _certificates(pki: pathlib.Path) -> None:
    """A CA, the apiserver's serving certificate signed by it, and the service-account key pair.
    ECDSA P-256 keys: every TLS handshake signs with the serving key, and an RSA-2048 signature costs
    the API server about ten times the CPU (a tenth of its time under a burst of new clients)."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *P256, "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=triphase-local-ca", cwd=pki)
    _openssl("req", *P256, "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", cwd=pki)
    (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
                                 "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
                                 "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext", cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: pathlib.Path, server: str, ca: pathlib.Path, token: str, user: str = "admin") -> None:
    """A kubeconfig for `user` with a bearer token (JSON is valid YAML)."""
    import base64

    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "triphase",
        "clusters": [{"name": "triphase", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "triphase", "context": {"cluster": "triphase", "user": user,
                                                      "namespace": "default"}}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


def _audit_flags(root: pathlib.Path, log: pathlib.Path | None) -> list[str]:
    if log is None:
        return []
    policy = root / "audit-policy.yaml"
    policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
                      "rules:\n- level: Metadata\n")
    return ["--audit-policy-file", str(policy), "--audit-log-path", str(log), "--audit-log-format", "json"]


def up(state: pathlib.Path | None = None, *, nodes: int = 4, gpus_per_node: int = 8,
       kubeconfig: pathlib.Path | None = None, progress: bool = True, timeout: float = 120,
       audit_log: pathlib.Path | None = None) -> Cluster:
    """Start the control plane (or return the one already running in `state`). `audit_log`: the API
    server writes one JSON line per request there (who, verb, resource; no bodies), for benchmarks
    that count a client's requests."""
    cluster = Cluster(state or default_state_dir())
    if cluster.pids() and all(cluster.running().values()) and cluster.healthy():
        _say(progress, f"already running: {cluster.server} (kubeconfig {cluster.kubeconfig})")
        _export_kubeconfig(cluster, kubeconfig)
        return cluster
    if cluster.pids():
        down(cluster.state, progress=False)
    tools = binaries.ensure(progress=progress)
    root = cluster.state
    root.mkdir(parents=True, exist_ok=True)
    pki, logs = root / "pki", root / "logs"
    logs.mkdir(exist_ok=True)
    _certificates(pki)
    token = secrets.token_hex(24)
    (pki / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    info: dict[str, Any] = {"server": server, "token": token, "pids": {}, "argv": {}}
    write_kubeconfig(cluster.kubeconfig, server, pki / "ca.crt", token)

    def start(name: str, args: list[str]) -> None:
        info["argv"][name] = [tools[name.split(":")[0]], *args]
        info["pids"][name] = _spawn(root, name, info["argv"][name])
        cluster.info_file.write_text(json.dumps(info, indent=2))

    _say(progress, f"starting etcd, kube-apiserver on {server}")
    etcd = f"http://127.0.0.1:{etcd_port}"
    start("etcd", ["--name", "triphase", "--data-dir", str(root / "etcd"), "--listen-client-urls", etcd,
                   "--advertise-client-urls", etcd, "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                   "--initial-cluster", f"triphase=http://127.0.0.1:{peer_port}", "--quota-backend-bytes",
                   str(2 << 30), "--unsafe-no-fsync", "--log-level", "warn"])
    start("kube-apiserver", [
        "--etcd-servers", etcd, "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
        "--secure-port", str(api_port), "--tls-cert-file", str(pki / "apiserver.crt"),
        "--tls-private-key-file", str(pki / "apiserver.key"), "--client-ca-file", str(pki / "ca.crt"),
        "--token-auth-file", str(pki / "tokens.csv"), "--authorization-mode", "RBAC",
        "--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file",
        str(pki / "sa.pub"), "--service-account-signing-key-file", str(pki / "sa.key"),
        "--service-cluster-ip-range", SERVICE_CIDR, "--allow-privileged", "--enable-priority-and-fairness=false",
        "--profiling=false", "--v=0", *_audit_flags(root, audit_log),
    ])
    _wait(cluster.healthy, timeout, "kube-apiserver to be ready", logs)
    manager_config = root / "controller.kubeconfig"
    write_kubeconfig(manager_config, server, pki / "ca.crt", token)
    _say(progress, "starting kube-controller-manager, kube-scheduler and kwok")
    start("kube-controller-manager", [
        "--kubeconfig", str(manager_config), "--bind-address", "127.0.0.1", "--secure-port", "0",
        "--leader-elect=false", "--service-account-private-key-file", str(pki / "sa.key"),
        "--root-ca-file", str(pki / "ca.crt"), "--cluster-signing-cert-file", str(pki / "ca.crt"),
        "--cluster-signing-key-file", str(pki / "ca.key"), "--service-cluster-ip-range", SERVICE_CIDR,
        "--controllers", "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route",
        "--concurrent-deployment-syncs", "10", "--concurrent-replicaset-syncs", "10", "--v=0",
    ])
    start("kube-scheduler", ["--kubeconfig", str(manager_config), "--bind-address", "127.0.0.1",
                             "--secure-port", "0", "--leader-elect=false", "--v=0"])
    start("kwok", ["--kubeconfig", str(manager_config), "--config", str(STAGES), "--manage-all-nodes=false",
                   "--manage-nodes-with-annotation-selector", f"{FAKE_NODE_ANNOTATION}=fake",
                   "--server-address", f"127.0.0.1:{free_port()}", "--cidr", "10.244.0.0/16"])
    for index in range(nodes):
        _create_node(cluster, f"gpu-node-{index}", gpus_per_node)
    _wait(lambda: _nodes_ready(cluster) >= nodes, timeout, f"{nodes} kwok nodes to be Ready", logs)
    for index in range(nodes):  # the not-ready taint set at creation (no node-lifecycle controller runs)
        cluster.api("PATCH", f"/api/v1/nodes/gpu-node-{index}", {"spec": {"taints": None}},
                    content_type="application/merge-patch+json")
    _wait(lambda: _has_default_service_account(cluster), timeout, "the default ServiceAccount", logs)
    _export_kubeconfig(cluster, kubeconfig)
    _say(progress, f"ready: {nodes} fake GPU nodes x {gpus_per_node} nvidia.com/gpu; "
                   f"export KUBECONFIG={kubeconfig or cluster.kubeconfig}")
    return cluster


def _spawn(root: pathlib.Path, name: str, argv: list[str]) -> int:
    log = open(root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=root)
    log.close()
    return proc.pid


def restart(state: pathlib.Path | None, component: str, *, timeout: float = 60) -> None:
    """Stop one component (SIGTERM, then SIGKILL) and start it again with the same command line; for
    the API server, wait until it is healthy again. For fault tests (an API server restart)."""
    cluster = Cluster(state or default_state_dir())
    info = cluster.info()
    pid = info["pids"][component]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for the process to exit, with a deadline
    with contextlib.suppress(ProcessLookupError):
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    info["pids"][component] = _spawn(cluster.state, component, info["argv"][component])
    cluster.info_file.write_text(json.dumps(info, indent=2))
    if component == "kube-apiserver":
        _wait(cluster.healthy, timeout, "kube-apiserver to be ready again", cluster.state / "logs")


def _export_kubeconfig(cluster: Cluster, path: pathlib.Path | None) -> None:
    if path is not None and path.resolve() != cluster.kubeconfig.resolve():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cluster.kubeconfig, path)
        path.chmod(0o600)


def _create_node(cluster: Cluster, name: str, gpus: int) -> None:
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    node = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {FAKE_NODE_ANNOTATION: "fake"},
                     "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                "nvidia.com/gpu.present": "true"}},
        "status": {"capacity": capacity, "allocatable": capacity},
    }
    try:
        cluster.api("POST", "/api/v1/nodes", node)
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise


def _nodes_ready(cluster: Cluster) -> int:
    try:
        nodes = cluster.api("GET", "/api/v1/nodes")["items"]
    except (OSError, ValueError):
        return 0
    return sum(any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
               for n in nodes)


def _has_default_service_account(cluster: Cluster) -> bool:
    try:
        cluster.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
    except (OSError, ValueError):
        return False
    return True


def down(state: pathlib.Path | None = None, *, progress: bool = True, keep: bool = False) -> bool:
    """Stop every component (SIGTERM, then SIGKILL) and remove the state; False if nothing ran."""
    cluster = Cluster(state or default_state_dir())
    pids = cluster.pids()
    for name in reversed(COMPONENTS):
        pid = pids.get(name)
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for processes to exit, with a deadline
    for pid in pids.values():
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    if not keep and cluster.state.exists():
        shutil.rmtree(cluster.state, ignore_errors=True)
    _say(progress, "stopped" if pids else "no cluster was running")
    return bool(pids)


def status(state: pathlib.Path | None = None) -> dict[str, Any]:
    cluster = Cluster(state or default_state_dir())
    running = cluster.running()
    return {
        "state": str(cluster.state), "server": cluster.server or None, "kubeconfig": str(cluster.kubeconfig),
        "components": {name: running.get(name, False) for name in COMPONENTS},
        "healthy": bool(running) and all(running.values()) and cluster.healthy(),
        "nodes_ready": _nodes_ready(cluster) if running else 0,
    }
