"""`triphase operator` on a real control plane, running as its least-privilege ServiceAccount: a sample
ServingDeployment becomes pools, a router and their objects; pods run on kwok's fake GPU nodes; the
status and printer columns follow; spec changes roll, /scale drives a pool, deletion garbage-collects,
a killed operator converges again, and two replicas elect one leader."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import random
import re
import time

import pytest

from tests.integration.operator.helpers import SAMPLE, operator
from tests.integration.operator.helpers import apply as _apply
from tests.integration.operator.helpers import kubectl_json as _json
from tests.load import load_in_background
from triphase.common import labels
from triphase.common.security import mtls, pki
from triphase.local.cluster import controlplane
from triphase.local.processes import http_ok, triphase_process, wait_for
from triphase.operator.kube import FIELD_MANAGER

pytestmark = pytest.mark.slow


def test_operator_is_forbidden_what_it_does_not_need(kube, operator_account):
    """It gets the Secrets it makes by name; listing or watching Secrets, anywhere, is not allowed."""
    for scope in (["-A"], ["-n", kube.namespace], ["-n", kube.namespace, "--watch", "--request-timeout=5s"]):
        result = kube.kubectl("get", "secrets", *scope, check=False, kubeconfig=operator_account)
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), scope


def test_a_missing_peering_object_is_explained(operator_account, tmp_path):
    args = ["operator", "--peering", "no-such-peering", "--liveness", "", "--metrics-port", "-1"]
    with triphase_process(tmp_path, "unpeered", args, timeout=90, env={"KUBECONFIG": str(operator_account)}):
        log = tmp_path / "unpeered.log"
        wait_for(lambda: "Waiting for ClusterKopfPeering 'no-such-peering'" in log.read_text(), 60,
                 "the operator to say what it waits for")
        assert "kubectl apply -f deploy/manifests/" in log.read_text() and "--standalone" in log.read_text()


def _children(kube, name):
    selector = f"{labels.DEPLOYMENT}={name}"
    found = {}
    for kind in ("deployments", "services", "configmaps", "poddisruptionbudgets", "servingpools", "rolebindings",
                 "networkpolicies", "secrets"):
        for item in _json(kube, "get", kind, "-l", selector)["items"]:
            found.setdefault(kind, []).append(item["metadata"]["name"])
    return {kind: sorted(names) for kind, names in found.items()}


EXPECTED = {
    "deployments": ["smollm2-decode", "smollm2-prefill", "smollm2-router"], "services": ["smollm2"],
    "configmaps": ["smollm2-config"], "rolebindings": ["smollm2-router"],
    "poddisruptionbudgets": ["smollm2-decode", "smollm2-prefill", "smollm2-router"],
    "servingpools": ["smollm2-decode", "smollm2-prefill"],
    "networkpolicies": ["smollm2-router", "smollm2-workers"],
    "secrets": ["smollm2-mtls-ca", "smollm2-mtls-router", "smollm2-mtls-worker"],
}


def _columns(header, row):
    """kubectl's table row by column (columns start where their header starts; empty cells stay empty)."""
    names = header.split()
    starts = [header.index(name) for name in names] + [max(len(row), len(header)) + 1]
    return {name: row[starts[i]:starts[i + 1]].strip() for i, name in enumerate(names)}


def _ready(kube):
    body = _json(kube, "get", "tsd", "smollm2")
    conditions = {c["type"]: c["status"] for c in (body.get("status") or {}).get("conditions") or []}
    return conditions.get("Ready") == "True" and body["status"]["observedGeneration"] == body["metadata"]["generation"]


def test_sample_becomes_a_running_deployment(kube, operator_account, tmp_path):
    with operator(tmp_path, operator_account) as (_, liveness_port):
        wait_for(lambda: http_ok(f"http://127.0.0.1:{liveness_port}/healthz"), 30, "kopf's liveness endpoint")
        _apply(kube, SAMPLE)
        wait_for(lambda: _children(kube, "smollm2") == EXPECTED, 60, "every child of the sample")
        decode = _json(kube, "get", "deployment", "smollm2-decode")
        container = decode["spec"]["template"]["spec"]["containers"][0]
        assert decode["spec"]["replicas"] == 2 and container["args"][:3] == ["worker", "--role", "decode"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        owner = decode["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("ServingDeployment", "smollm2", True)
        # Children are created by server-side apply (create-only), not POSTed: the operator is the Apply
        # manager of every field it wrote, so a field a later spec drops is removed.
        for kind, name in (("deployment", "smollm2-decode"), ("secret", "smollm2-mtls-worker")):
            managers = {(m["manager"], m["operation"]) for m in
                        _json(kube, "get", kind, name, "--show-managed-fields")["metadata"]["managedFields"]
                        if m["manager"] == FIELD_MANAGER}
            assert managers == {(FIELD_MANAGER, "Apply")}, (kind, name)
        # no finalizer: deleting it (or its namespace) never waits for the operator
        assert not _json(kube, "get", "tsd", "smollm2")["metadata"].get("finalizers")
        # The KV side-channel (UCX, no authentication) is reachable from the deployment's workers only,
        # as the API server stores the policy
        ingress = _json(kube, "get", "networkpolicy", "smollm2-workers")["spec"]["ingress"]
        unrestricted = [rule["from"] for rule in ingress if "ports" not in rule]
        assert unrestricted == [[{"podSelector": {"matchLabels": {labels.DEPLOYMENT: "smollm2",
                                                                  labels.COMPONENT: "worker"}}}]]
        wait_for(lambda: _ready(kube), 90, "the ServingDeployment to be Ready")
        pods = _json(kube, "get", "pods", "-l", f"{labels.DEPLOYMENT}=smollm2")["items"]
        assert len(pods) == 4 and all(p["status"]["phase"] == "Running" for p in pods)
        assert all(p["spec"]["nodeName"].startswith("gpu-node-") for p in pods)
        header, row = kube.kubectl("get", "tsd", "smollm2").stdout.splitlines()[:2]
        assert _columns(header, row) == {"NAME": "smollm2", "READY": "True", "PREFILL": "1/1", "DECODE": "2/2",
                                         "ENCODE": "", "ENDPOINT": f"http://smollm2.{kube.namespace}.svc:8000/v1",
                                         "AGE": _columns(header, row)["AGE"]}

        # a spec change rolls the pool's pods (new config hash in the template)
        before = decode["spec"]["template"]["metadata"]["annotations"]["triphase.dev/config-hash"]
        kube.kubectl("patch", "tsd", "smollm2", "--type", "merge", "-p",
                     json.dumps({"spec": {"pools": {"decode": {"engine": {"maxBatchedTokens": 256}}}}}))
        wait_for(lambda: _json(kube, "get", "deployment", "smollm2-decode")["spec"]["template"]["metadata"][
            "annotations"]["triphase.dev/config-hash"] != before, 30, "the decode pool to roll")

        # /scale on the pool: the Deployment follows, the spec's initial count does not fight it
        kube.kubectl("scale", "servingpool/smollm2-decode", "--replicas=3")
        wait_for(lambda: _json(kube, "get", "deployment", "smollm2-decode")["spec"]["replicas"] == 3, 30,
                 "the decode Deployment to follow the pool")
        wait_for(lambda: _json(kube, "get", "tsd", "smollm2")["status"]["readySummary"]["decode"] == "3/3", 60,
                 "the status to count 3 decode workers")

        # drift is corrected
        kube.kubectl("scale", "deployment/smollm2-prefill", "--replicas=5")
        wait_for(lambda: _json(kube, "get", "deployment", "smollm2-prefill")["spec"]["replicas"] == 1, 30,
                 "the operator to undo the drift")


def test_killed_operator_converges_without_duplicates(kube, operator_account, tmp_path):
    second = copy.deepcopy(SAMPLE)
    second["metadata"]["name"] = "second"
    # Low priorities: the killed replica's stale peering entry (alive for 60 s) must not look like a rival
    # of the same priority to the successor (2 > 1) or to later tests (100).
    with operator(tmp_path, operator_account, "victim", priority=1) as (proc, _):
        _apply(kube, second)
        wait_for(lambda: _children(kube, "second").get("servingpools"), 30, "the reconcile to start")
        proc.kill()  # SIGKILL, possibly mid-reconcile
    with operator(tmp_path, operator_account, "successor", priority=2):
        expected = {kind: [n.replace("smollm2", "second") for n in names] for kind, names in EXPECTED.items()}
        wait_for(lambda: _children(kube, "second") == expected, 60, "the restarted operator to converge")
        wait_for(lambda: _json(kube, "get", "tsd", "second").get("status", {}).get("readySummary"), 60, "status")
    assert _children(kube, "second") == expected  # nothing duplicated


def _args_of(kube, name):
    deployment = _json(kube, "get", "deployment", f"{name}-decode")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def _renamed(name):
    return {kind: [n.replace("smollm2", name) for n in names] for kind, names in EXPECTED.items()}


def test_operator_killed_mid_reconcile_again_and_again_converges(kube, operator_account, tmp_path):
    """SIGKILL the operator a random moment after it starts, each time with a new spec to apply;
    the survivor converges every deployment to its latest spec with no extra children.
    TRIPHASE_OPERATOR_KILLS sets the kills (docs/reliability.md records a long run)."""
    kills = int(os.environ.get("TRIPHASE_OPERATOR_KILLS", "5"))
    names = ["churn-a", "churn-b", "churn-c"]
    rng = random.Random(7)
    for round_ in range(kills + 1):
        for name in names:  # each round changes every spec: a reconcile is always due
            body = copy.deepcopy(SAMPLE)
            body["metadata"]["name"] = name
            body["spec"]["pools"]["decode"]["engine"]["maxBatchedTokens"] = 128 + round_
            _apply(kube, body)
        if round_ == kills:
            break
        with operator(tmp_path, operator_account, f"killed-{round_}") as (proc, _):
            time.sleep(rng.uniform(0.0, 1.5))  # the fault schedule: a random moment into the reconciles
            proc.kill()
    with operator(tmp_path, operator_account, "survivor"):
        for name in names:
            wait_for(lambda n=name: _children(kube, n) == _renamed(n), 120, f"{name}'s children")
            wait_for(lambda n=name: _args_of(kube, n)[_args_of(kube, n).index("--max-batched-tokens") + 1]
                     == str(128 + kills), 120, f"{name} at its latest spec")
        for name in names:
            assert _children(kube, name) == _renamed(name)  # nothing duplicated, nothing missing
            kube.kubectl("delete", "tsd", name, "--wait=false")


def test_the_operator_rides_out_an_api_server_restart(kube, operator_account, tmp_path):
    body = copy.deepcopy(SAMPLE)
    body["metadata"]["name"] = "survivor"
    with operator(tmp_path, operator_account, "steady") as (proc, _):
        _apply(kube, body)
        wait_for(lambda: _children(kube, "survivor") == _renamed("survivor"), 60, "the first reconcile")
        controlplane.restart(kube.cluster.state, "kube-apiserver")
        kube.kubectl("patch", "tsd", "survivor", "--type", "merge", "-p",
                     json.dumps({"spec": {"pools": {"decode": {"engine": {"maxNumSeqs": 32}}}}}))
        wait_for(lambda: _args_of(kube, "survivor")[_args_of(kube, "survivor").index("--max-num-seqs") + 1] == "32",
                 120, "the operator to apply a change made after the restart")
        assert proc.poll() is None  # recovered without a restart of its own
        kube.kubectl("delete", "tsd", "survivor", "--wait=false")


def test_a_pool_removed_from_the_spec_is_deleted(kube, operator_account, tmp_path):
    """Dropping the prefill pool (the decode pool then prefills locally) deletes its ServingPool,
    Deployment and budget, and leaves the rest alone."""
    shrinking = copy.deepcopy(SAMPLE)
    shrinking["metadata"]["name"] = "shrinking"
    expected = {kind: [n.replace("smollm2", "shrinking") for n in names] for kind, names in EXPECTED.items()}
    with operator(tmp_path, operator_account):
        _apply(kube, shrinking)
        wait_for(lambda: _children(kube, "shrinking") == expected, 60, "every child")
        kube.kubectl("patch", "tsd", "shrinking", "--type", "json", "-p",
                     json.dumps([{"op": "remove", "path": "/spec/pools/prefill"}]))
        without = {kind: [n for n in names if n != "shrinking-prefill"] for kind, names in expected.items()}
        wait_for(lambda: _children(kube, "shrinking") == without, 60, "the prefill pool to go")
        # A removal interrupted after its ServingPool went leaves a worker Deployment behind (its owner
        # lives on, so the garbage collector keeps it): the next resync removes it too.
        uid = _json(kube, "get", "tsd", "shrinking")["metadata"]["uid"]
        leftover = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
            "name": "shrinking-prefill", "namespace": kube.namespace,
            "labels": {labels.DEPLOYMENT: "shrinking", labels.COMPONENT: "worker", labels.ROLE: "prefill"},
            "ownerReferences": [{"apiVersion": "triphase.dev/v1alpha1", "kind": "ServingDeployment",
                                 "name": "shrinking", "uid": uid, "controller": True}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "leftover"}}, "template": {
                "metadata": {"labels": {"app": "leftover"}},
                "spec": {"containers": [{"name": "worker", "image": "triphase:left"}]}}}}
        kube.api("POST", f"/apis/apps/v1/namespaces/{kube.namespace}/deployments", leftover)
        wait_for(lambda: _children(kube, "shrinking") == without, 60, "the left-behind prefill Deployment to go")
    kube.kubectl("delete", "tsd", "shrinking", "--wait=false")


SIM = ["--engine", "sim", "--sim-prefill-per-token-ms", "1", "--sim-decode-per-seq-ms", "5"]


def _bundle_dir(kube, tmp_path, name, identity):
    """The files of the deployment's `identity` bundle Secret, as its pods would mount them."""
    secret = wait_for(lambda: _secret(kube, f"{name}-mtls-{identity}"), 60, f"Secret {name}-mtls-{identity}")
    return mtls.write_bundle(tmp_path / f"{name}-{identity}", secret)


def _secret(kube, name):
    found = kube.kubectl("get", "secret", name, "-o", "json", check=False)
    if found.returncode != 0:
        return None
    return {key: base64.b64decode(value) for key, value in json.loads(found.stdout)["data"].items()}


def test_the_operator_issues_mtls_bundles_and_renews_a_bad_one(kube, operator_account, tmp_path):
    secured = copy.deepcopy(SAMPLE)
    secured["metadata"]["name"] = "secured"
    with operator(tmp_path, operator_account):
        _apply(kube, secured)
        ca = wait_for(lambda: _secret(kube, "secured-mtls-ca"), 60, "the deployment's CA")
        worker = wait_for(lambda: _secret(kube, "secured-mtls-worker"), 60, "the workers' bundle")
        router = wait_for(lambda: _secret(kube, "secured-mtls-router"), 60, "the router's bundle")
        assert set(worker) == {"ca.crt", "tls.crt", "tls.key", "kv-ticket.key", "prefix-salt"}
        assert set(router) == {"ca.crt", "tls.crt", "tls.key", "prefix-salt"}  # no ticket key: it signs nothing
        assert pki.identity_of(worker["tls.crt"]) == "worker" and pki.identity_of(router["tls.crt"]) == "router"
        assert pki.signed_by(worker["tls.crt"], ca["ca.crt"]) and worker["ca.crt"] == ca["ca.crt"]
        assert worker["kv-ticket.key"] == ca["kv-ticket.key"] and router["prefix-salt"] == ca["prefix-salt"]
        owners = _json(kube, "get", "secret", "secured-mtls-ca")["metadata"]["ownerReferences"]
        assert owners[0]["name"] == "secured"
        # a certificate from elsewhere in the worker bundle: the next reconcile replaces it
        foreign = pki.issue(pki.new_ca("elsewhere"), pki.Identity.WORKER)
        kube.kubectl("patch", "secret", "secured-mtls-worker", "--type", "merge", "-p", json.dumps(
            {"data": {"tls.crt": base64.b64encode(foreign.cert_pem).decode()}}))
        wait_for(lambda: pki.signed_by(_secret(kube, "secured-mtls-worker")["tls.crt"], ca["ca.crt"]), 30,
                 "the operator to issue a good certificate again")
        assert _secret(kube, "secured-mtls-ca") == ca  # the CA itself stays
    kube.kubectl("delete", "tsd", "secured", "--wait=false")


def test_the_operator_takes_over_and_deletes_nothing_it_does_not_own(kube, operator_account, tmp_path):
    foreign = copy.deepcopy(SAMPLE)
    foreign["metadata"]["name"] = "foreign"
    kube.kubectl("create", "configmap", "foreign-config", "--from-literal=mine=yes")
    stray = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "foreign-encode", "namespace": kube.namespace,  # looks like a pool the spec does not have
        "labels": {labels.DEPLOYMENT: "foreign", labels.COMPONENT: "worker", labels.ROLE: "encode"}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "stray"}}, "template": {
            "metadata": {"labels": {"app": "stray"}},
            "spec": {"containers": [{"name": "worker", "image": "someone:else"}]}}}}
    kube.api("POST", f"/apis/apps/v1/namespaces/{kube.namespace}/deployments", stray)
    with operator(tmp_path, operator_account) as (proc, _):
        _apply(kube, foreign)

        def degraded():
            conditions = (_json(kube, "get", "tsd", "foreign").get("status") or {}).get("conditions") or []
            return next((c for c in conditions if c["type"] == "Degraded" and c["status"] == "True"), None)

        condition = wait_for(degraded, 60, "the deployment to report the name clash")
        assert condition["reason"] == "NotOwned" and "ConfigMap foreign-config" in condition["message"]
        config = _json(kube, "get", "configmap", "foreign-config")
        assert config["data"] == {"mine": "yes"} and not config["metadata"].get("ownerReferences")
        wait_for(lambda: any("ConfigMap foreign-config" in m for m in _events(kube, "NotOwned")), 30, "a Warning")
        kube.kubectl("delete", "configmap", "foreign-config")

        def owned_config():
            found = kube.kubectl("get", "configmap", "foreign-config", "-o", "json", check=False)
            return found.returncode == 0 and json.loads(found.stdout)["metadata"].get("ownerReferences")

        wait_for(owned_config, 60, "the operator to make its own ConfigMap once the name is free")
        wait_for(lambda: degraded() is None, 60, "the deployment to be reconciled without a clash")
        # Now it knows the ConfigMap's uid and applies pinned to it without reading it first: a name
        # freed is taken again, a name taken by someone else is refused again.
        kube.kubectl("delete", "configmap", "foreign-config")
        wait_for(owned_config, 60, "the operator to make its ConfigMap again")

        def taken_by_someone_else():  # before the operator's resync makes its own again
            kube.kubectl("delete", "configmap", "foreign-config", "--ignore-not-found", check=False)
            made = kube.kubectl("create", "configmap", "foreign-config", "--from-literal=mine=again", check=False)
            return made.returncode == 0

        wait_for(taken_by_someone_else, 60, "someone else to take the name")
        wait_for(degraded, 60, "the clash to be reported again")
        assert _json(kube, "get", "configmap", "foreign-config")["data"] == {"mine": "again"}
        assert _json(kube, "get", "deployment", "foreign-encode")["spec"]["template"]["spec"]["containers"][0][
            "image"] == "someone:else"  # not its pool: never deleted
        # no finalizer: with the operator gone, the deployment is deleted at once
        proc.kill()
        proc.wait()
    kube.kubectl("delete", "tsd", "foreign", "--timeout=30s")
    kube.kubectl("delete", "deployment", "foreign-encode")


def _events(kube, reason):
    items = _json(kube, "get", "events", "--field-selector", f"reason={reason}")["items"]
    return [e["message"] for e in items]


def test_the_operator_balances_roles(kube, operator_account, tmp_path):
    """roleSwitching.enabled: the operator watches the deployment's workers (here sim workers on
    127.0.0.1, which the kwok pods point at with their endpoint annotation) and, under a prefill
    backlog, switches a decode worker to prefill: the worker, its pod label, an Event and
    status.pools show it."""
    balanced = copy.deepcopy(SAMPLE)
    balanced["metadata"]["name"] = "balanced"
    balanced["spec"]["pools"]["prefill"]["replicas"] = 2
    balanced["spec"]["slo"] = {"ttftSeconds": 2.0, "tpotSeconds": 0.05}
    balanced["spec"]["roleSwitching"] = {"enabled": True, "maxSwitchesPerMinute": 6, "minPerRole": 1}
    with contextlib.ExitStack() as stack:
        stack.enter_context(operator(tmp_path, operator_account))
        _apply(kube, balanced)
        # the workers and the router run here with the bundles their pods would mount: the operator's
        # balancer reaches them with its own `control` certificate
        bundles = {identity: _bundle_dir(kube, tmp_path, "balanced", identity) for identity in ("worker", "router")}
        endpoints = {}
        for name, role in [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")]:
            _, port = stack.enter_context(triphase_process(tmp_path, name, [
                "worker", "--role", role, "--port", "0", "--mtls-dir", str(bundles["worker"]), *SIM]))
            endpoints.setdefault(role, []).append(f"127.0.0.1:{port}")

        def pods(role):
            return _json(kube, "get", "pods", "-l", f"{labels.DEPLOYMENT}=balanced,{labels.ROLE}={role}")["items"]

        wait_for(lambda: all(len(pods(r)) == 2 and all(p["status"].get("phase") == "Running" for p in pods(r))
                             for r in endpoints), 90, "the worker pods to run")
        for role, eps in endpoints.items():
            for pod, endpoint in zip(pods(role), eps, strict=True):
                kube.kubectl("annotate", "pod", pod["metadata"]["name"], f"{labels.ENDPOINT}={endpoint}")

        def current_roles():
            return sorted((p["metadata"]["labels"][labels.ROLE], p["metadata"]["labels"].get(labels.CURRENT_ROLE, ""))
                          for r in endpoints for p in pods(r))  # "": not labelled yet

        # Every pod is labelled with the role its worker reports.
        wait_for(lambda: current_roles() == [("decode", "decode")] * 2 + [("prefill", "prefill")] * 2, 30,
                 "the pods to be labelled with their workers' roles")
        every = ",".join(endpoints["prefill"] + endpoints["decode"])
        _, router_port = stack.enter_context(triphase_process(tmp_path, "router", [
            "router", "--workers", every, "--port", "0", "--mtls-dir", str(bundles["router"])]))
        with load_in_background(f"http://127.0.0.1:{router_port}", "hello " * 3000, max_tokens=4, lanes=16) as load:
            wait_for(lambda: ("decode", "prefill") in current_roles(), 60, "a decode worker to switch to prefill")
        assert not load.failed, load.failed[:3]
        assert current_roles().count(("decode", "decode")) == 1  # minPerRole
        messages = _events(kube, "RoleSwitched")
        assert any("from decode to prefill (prefill-backlog)" in m for m in messages), messages
        wait_for(lambda: _json(kube, "get", "tsd", "balanced")["status"]["pools"]["decode"]["byRole"] ==
                 {"decode": 1, "prefill": 1}, 30, "status.pools.decode.byRole to count the switch")
        # Turned off: the daemon stops and the roles stay as they are.
        kube.kubectl("patch", "tsd", "balanced", "--type", "merge", "-p",
                     json.dumps({"spec": {"roleSwitching": {"enabled": False}}}))
    kube.kubectl("delete", "tsd", "balanced", "--wait=false")


def test_two_replicas_elect_one_leader(kube, operator_account, tmp_path):
    """The lower-priority replica starts paused and only acts once the leader is gone."""
    with contextlib.ExitStack() as leader_stack, operator(tmp_path, operator_account, "follower", priority=10):
        leader_stack.enter_context(operator(tmp_path, operator_account, "leader"))
        elected = copy.deepcopy(SAMPLE)
        elected["metadata"]["name"] = "elected"
        _apply(kube, elected)
        # The count of objects depends on whether the session's cluster serves the monitoring API by now.
        applied = re.compile(r"elected: Applied \d+ objects for generation (\d+)")
        wait_for(lambda: "1" in applied.findall((tmp_path / "leader.log").read_text()), 60, "the leader to reconcile")
        assert "elected:" not in (tmp_path / "follower.log").read_text()
        leader_stack.close()  # the leader leaves (its peering entry goes with it)
        kube.kubectl("patch", "tsd", "elected", "--type", "merge", "-p",
                     json.dumps({"spec": {"pools": {"decode": {"engine": {"maxNumSeqs": 32}}}}}))
        wait_for(lambda: "2" in applied.findall((tmp_path / "follower.log").read_text()), 90,
                 "the follower to take over")
    kube.kubectl("delete", "tsd", "elected", "--wait=false")


def _stand_in_crd(kind: str, plural: str) -> dict[str, object]:
    """A stand-in for one of the Prometheus operator's CRDs (only its API is needed)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    }


def test_monitoring_objects_when_prometheus_operator_is_installed(kube, operator_account, tmp_path):
    """With the Prometheus operator's API served, the operator adds a PodMonitor scraping the workers' and
    router's metrics ports and a PrometheusRule of the deployment's SLO, both owned by it."""
    for kind, plural in (("PodMonitor", "podmonitors"), ("PrometheusRule", "prometheusrules")):
        _apply(kube, _stand_in_crd(kind, plural))
        kube.kubectl("wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com", "--timeout=30s")
    monitored = copy.deepcopy(SAMPLE)
    monitored["metadata"]["name"] = "monitored"
    monitored["spec"]["slo"] = {"ttftSeconds": 1.5, "tpotSeconds": 0.05, "attainmentTarget": 0.99}
    with operator(tmp_path, operator_account, extra=["--monitoring-label", "release=prometheus"]):
        _apply(kube, monitored)
        wait_for(lambda: all(kube.kubectl("get", kind, name, check=False).returncode == 0
                             for kind, name in (("podmonitors.monitoring.coreos.com", "monitored"),
                                                ("prometheusrules.monitoring.coreos.com", "monitored-slo"))),
                 60, "the PodMonitor and the PrometheusRule")
    monitor = _json(kube, "get", "podmonitors.monitoring.coreos.com", "monitored")
    assert monitor["spec"]["selector"]["matchLabels"] == {labels.DEPLOYMENT: "monitored"}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}  # workers' and router's
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    rule = _json(kube, "get", "prometheusrules.monitoring.coreos.com", "monitored-slo")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["ownerReferences"][0]["name"] == "monitored"
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("histogram_fraction(0, 1.5," in e for e in exprs)  # the spec's own TTFT target
    assert any(r.get("alert") == "TriphaseErrorBudgetBurn" for g in rule["spec"]["groups"] for r in g["rules"])


def test_deleting_collects_every_child(kube, operator_account, tmp_path):
    names = ("smollm2", "second", "elected", "monitored", "shrinking")
    with operator(tmp_path, operator_account):
        for name in names:
            kube.kubectl("delete", "tsd", name, "--wait=true", "--timeout=60s", check=False)
        wait_for(lambda: not any(_children(kube, n) for n in names), 60, "the garbage collector to delete the children")
