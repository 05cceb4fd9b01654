"""The router discovers its workers from pods on a real API server: pods labelled as workers that are
Running and Ready join (kwok runs them on fake GPU nodes; their endpoint annotation points at sim
workers on 127.0.0.1), deleted pods leave. The router uses a ServiceAccount token that may only read
pods."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from triphase.common import labels
from triphase.local.processes import triphase_process, wait_for
from triphase.operator import builders

pytestmark = pytest.mark.slow
SIM = ["--engine", "sim", "--sim-prefill-ms", "2", "--sim-decode-ms", "2"]


def _pod(name, endpoint):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {labels.COMPONENT: "worker", labels.DEPLOYMENT: "demo"},
                         "annotations": {labels.ENDPOINT: endpoint}},
            "spec": {"securityContext": builders.POD_SECURITY,  # the namespace enforces "restricted"
                     "containers": [{"name": "worker", "image": "triphase:test",
                                     "ports": [{"name": labels.GRPC_PORT_NAME, "containerPort": 50051}],
                                     "resources": {"limits": {"nvidia.com/gpu": "1"}},
                                     "securityContext": builders.CONTAINER_SECURITY}]}}


def _router_kubeconfig(kube, tmp_path):
    """A ServiceAccount allowed to get, list and watch pods in the namespace, and a kubeconfig with its token."""
    ns = kube.namespace
    kube.api("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
             {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "router"}})
    kube.api("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "router"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]})
    kube.api("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "router"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "router"},
        "subjects": [{"kind": "ServiceAccount", "name": "router", "namespace": ns}]})
    return kube.account_kubeconfig(tmp_path / "router.kubeconfig", "router", user="router")


def _workers(url):
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return sorted(w["endpoint"] for w in json.load(response)["workers"] if w["healthy"])
    except urllib.error.HTTPError as exc:
        return sorted(w["endpoint"] for w in json.load(exc)["workers"] if w["healthy"])
    except OSError:
        return None


def test_router_follows_worker_pods(kube, tmp_path):
    ns = kube.namespace
    config = _router_kubeconfig(kube, tmp_path)
    assert kube.kubectl("get", "secrets", check=False, kubeconfig=config).returncode != 0  # least privilege
    with triphase_process(tmp_path, "prefill", ["worker", "--role", "prefill", "--port", "0", *SIM]) as (_, p1), \
            triphase_process(tmp_path, "decode", ["worker", "--role", "decode", "--port", "0", *SIM]) as (_, p2), \
            triphase_process(tmp_path, "router", ["router", "--discovery", "kubernetes", "--namespace", ns,
                                                  "--kubeconfig", str(config), "--port", "0"]) as (_, port):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _workers(url) is not None, 30, "the router")
        assert _workers(url) == []  # no worker pods yet
        prefill, decode = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
        kube.api("POST", f"/api/v1/namespaces/{ns}/pods", _pod("prefill-0", prefill))
        kube.api("POST", f"/api/v1/namespaces/{ns}/pods", _pod("decode-0", decode))
        other = _pod("other", "127.0.0.1:1")
        other["metadata"]["labels"][labels.COMPONENT] = "router"  # not selected
        kube.api("POST", f"/api/v1/namespaces/{ns}/pods", other)
        wait_for(lambda: _workers(url) == sorted([prefill, decode]), 30, "both worker pods to be discovered")

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="hello", max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens == 8

        kube.api("DELETE", f"/api/v1/namespaces/{ns}/pods/prefill-0")
        wait_for(lambda: _workers(url) == [decode], 30, "the deleted pod's worker to leave")
        reply = client.completions.create(model=model, prompt="hello", max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens == 8  # the decode worker prefills locally
