"""What the operator's integration tests share: the sample, the operator's ServiceAccount (a fixture in
conftest.py) and `triphase operator` as a process. One module, so the peering priorities of every start
in the session keep rising (a replica stopped in one module must not pause the next module's)."""

from __future__ import annotations

import contextlib
import json
import pathlib

import yaml

from triphase.common.process.net import free_port
from triphase.local.processes import triphase_process

ROOT = pathlib.Path(__file__).resolve().parents[3]
SAMPLE = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2-disaggregated.yaml").read_text())
SYSTEM = "triphase-system"


def kubectl_json(kube, *args):
    return json.loads(kube.kubectl(*args, "-o", "json").stdout)


def apply(kube, obj):
    kube.kubectl("apply", "-f", "-", input_text=json.dumps(obj))


def operator_account(kube, tmp_path_factory):
    """CRDs, RBAC and the peering object as a platform engineer would apply them; a kubeconfig with the
    operator ServiceAccount's token."""
    with contextlib.suppress(Exception):
        kube.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": SYSTEM}})
    kube.kubectl("apply", "--server-side", "-f", str(ROOT / "deploy" / "crds"))
    kube.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    kube.kubectl("apply", "-n", SYSTEM, "-f", str(ROOT / "deploy" / "manifests"))
    return kube.account_kubeconfig(tmp_path_factory.mktemp("operator") / "operator.kubeconfig", "triphase-operator",
                                   SYSTEM, user="operator")


_STARTS = iter(range(100, 1000))


@contextlib.contextmanager
def operator(tmp_path, config, name="operator", priority=None, extra=()):
    """`triphase operator` as the ServiceAccount (KUBECONFIG), resyncing every second. By default each
    start outranks the ones before it: a replica stopped earlier may leave its peering entry behind for
    its 60 s lifetime, and an entry of the same priority would pause the new replica until it expires."""
    priority = next(_STARTS) if priority is None else priority
    args = ["operator", "--peering", "triphase", "--priority", str(priority), "--resync-seconds", "1",
            "--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--metrics-host", "127.0.0.1",
            "--metrics-port", "0", *extra]
    with triphase_process(tmp_path, name, args, timeout=90, env={"KUBECONFIG": str(config)}) as (proc, port):
        yield proc, port
