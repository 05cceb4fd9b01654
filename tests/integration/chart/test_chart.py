"""The Helm chart on the real control plane (helm, kube-apiserver and the Prometheus operator's own CRDs,
all from the Go module proxy): lint, render, validate on the API server, install into a namespace that
enforces Pod Security "restricted", `helm test`, every sample Ready, upgrade, uninstall.

kwok pods run no containers, so the processes that must really run are run here, with what they would
have in the cluster: the operator with the chart's ServiceAccount token and the chart's arguments, and
the `helm test` pod's command (its Service addresses pointed at those local processes), whose exit code
becomes the pod's phase as a kubelet would report it.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml

from triphase.cli import build_parser
from triphase.common.process.net import free_port
from triphase.local import prometheus
from triphase.local.cluster import binaries
from triphase.local.processes import triphase_process

ROOT = pathlib.Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "triphase"
VALUES = [None, *sorted((CHART / "ci").glob("*.yaml"))]
MONITORING_APIS = ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor",
                   "monitoring.coreos.com/v1/PrometheusRule"]
RELEASE = "tp"


def _helm(kube, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([binaries.ensure(progress=False).bin / "helm", "--kubeconfig", str(kube.kubeconfig),
                             *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {result.stdout}{result.stderr}")
    return result


def _render(kube, values: pathlib.Path | None, *extra: str) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "-n", kube.namespace, "--kube-version",
            binaries.KUBERNETES_VERSION.lstrip("v"), *(f"--api-versions={a}" for a in MONITORING_APIS), *extra]
    if values:
        args += ["-f", str(values)]
    return [doc for doc in yaml.safe_load_all(_helm(kube, *args).stdout) if doc]


def _containers(docs: list[dict]) -> list[dict]:
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    pods += [d["spec"] for d in docs if d["kind"] == "Pod"]
    return [c for pod in pods for c in pod["containers"]]


@pytest.fixture(scope="module")
def monitoring_crds(kube):
    """The Prometheus operator's real CRDs: the API server then validates our monitoring objects."""
    for path in prometheus.operator_crds():
        kube.kubectl("apply", "--server-side", "-f", str(path))
    kube.kubectl("wait", "--for=condition=Established", "crd/prometheusrules.monitoring.coreos.com",
                 "crd/servicemonitors.monitoring.coreos.com", "crd/podmonitors.monitoring.coreos.com", "--timeout=60s")


def test_chart_lints_and_every_container_runs_a_real_command(kube) -> None:
    parser = build_parser()
    for values in VALUES:
        _helm(kube, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
        containers = _containers(_render(kube, values))
        assert containers
        for container in containers:
            # The image's entry point is `triphase`; the test pod names it as a module.
            command = container.get("command") or ["triphase"]
            assert command in (["triphase"], ["python", "-m", "triphase.cli"]), command
            parser.parse_args(container["args"])  # exits (fails the test) on an unknown subcommand or flag
    containerfile = (ROOT / "Containerfile").read_text()
    assert 'ENTRYPOINT ["triphase"]' in containerfile
    assert 'triphase = "triphase.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_values_are_documented_and_schema_checked(kube) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = (CHART / "values.yaml").read_text().splitlines()

    def walk(node: dict, props: dict, path: str) -> None:
        assert set(node) == set(props["properties"]), f"{path}: values and schema differ"
        for key, value in node.items():
            entry = props["properties"][key]
            assert entry.get("description"), f"{path}{key}: no description in the schema"
            if entry.get("additionalProperties") is False:
                walk(value, entry, f"{path}{key}.")

    walk(values, schema, "")
    owned = set()  # dotted paths of the keys of our own objects (free-form maps like resources aside)

    def collect(props: dict, path: str) -> None:
        for key, entry in props["properties"].items():
            owned.add(path + key)
            if entry.get("additionalProperties") is False:
                collect(entry, f"{path}{key}.")

    collect(schema, "")
    stack: list[str] = []
    for i, line in enumerate(text):
        match = re.match(r"^(\s*)([A-Za-z]\w*):", line)
        if not match:
            continue
        stack = [*stack[:len(match.group(1)) // 2], match.group(2)]
        if ".".join(stack) in owned:
            assert text[i - 1].strip().startswith("#"), f"values.yaml:{i + 1}: {line.strip()} has no comment above"
    bad = _helm(kube, "template", RELEASE, str(CHART), "--kube-version", "1.36.0", "--set", "nope=1", check=False)
    assert bad.returncode != 0 and "additional properties 'nope' not allowed" in bad.stderr


def test_rendered_manifests_pass_the_api_server(kube, monitoring_crds) -> None:
    for namespace in ("team-a", "team-b"):  # what ci/namespaced-values.yaml watches
        kube.kubectl("create", "namespace", namespace, check=False)
    kube.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))  # as helm installs them: first
    kube.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "crd/kopfpeerings.kopf.dev",
                 "--timeout=60s")
    for values in VALUES:
        by_namespace: dict[str, list[dict]] = {}
        for doc in _render(kube, values):
            by_namespace.setdefault(doc["metadata"].get("namespace", kube.namespace), []).append(doc)
        for namespace, docs in by_namespace.items():
            applied = kube.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-",
                                   "--namespace", namespace, input_text=yaml.safe_dump_all(docs), check=False)
            assert applied.returncode == 0, f"{values}: {applied.stderr}"
            assert "PodSecurity" not in applied.stderr, applied.stderr  # the namespace warns on "restricted"


def _kubelet_for_test_pods(kube, stop: threading.Event, rewrite: dict[str, str], log: list[str]) -> None:
    """Run each `helm test` pod's command here once kwok has it Running, with its Service URLs rewritten
    to the local processes, and report the exit code as the pod's phase."""
    done: set[str] = set()
    while not stop.wait(0.2):
        pods = json.loads(kube.kubectl("get", "pods", "-l", "app.kubernetes.io/component=test", "-o", "json").stdout)
        for pod in pods["items"]:
            uid = pod["metadata"]["uid"]
            if uid in done or (pod.get("status") or {}).get("phase") != "Running":
                continue
            done.add(uid)
            container = pod["spec"]["containers"][0]
            args = [rewrite.get(a, a) for a in container["args"]]
            run = subprocess.run([sys.executable, "-m", "triphase.cli", *args], capture_output=True, text=True,
                                 timeout=60, check=False)
            log.append(run.stdout + run.stderr)
            phase = "Succeeded" if run.returncode == 0 else "Failed"
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            status = {"status": {"phase": phase, "containerStatuses": [{
                "name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                "restartCount": 0, "started": False,
                "state": {"terminated": {"exitCode": run.returncode, "reason": "Completed" if run.returncode == 0
                                         else "Error", "startedAt": now, "finishedAt": now}}}]}}
            kube.kubectl("patch", "pod", pod["metadata"]["name"], "--subresource=status", "--type=merge", "-p",
                         json.dumps(status))


def test_install_test_samples_upgrade_uninstall(kube, monitoring_crds, tmp_path) -> None:
    ns = kube.namespace
    fullname = f"{RELEASE}-triphase"
    values = ["--set", f"operator.peering={RELEASE}-peering", "--set", "monitoring.labels.release=prometheus"]
    _helm(kube, "install", RELEASE, str(CHART), "-n", ns, *values, "--wait", "--timeout", "120s")

    # The operator as the chart's ServiceAccount, with the chart's arguments (ports made local).
    config = kube.account_kubeconfig(tmp_path / "operator.kubeconfig", fullname, user="operator")
    deployment = json.loads(kube.kubectl("get", "deployment", fullname, "-o", "json").stdout)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    live = free_port()
    args[args.index("--liveness") + 1] = f"http://127.0.0.1:{live}/healthz"
    args[args.index("--metrics-port") + 1] = "0"
    args += ["--metrics-host", "127.0.0.1"]
    with triphase_process(tmp_path, "operator", args, timeout=90, env={"KUBECONFIG": str(config)}):
        metrics_port = int((tmp_path / "operator.port.metrics").read_text())
        service = f"http://{fullname}-metrics.{ns}.svc"
        rewrite = {f"{service}:8080/healthz": f"http://127.0.0.1:{live}/healthz",
                   f"{service}:8081/metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
        stop, log = threading.Event(), []
        kubelet = threading.Thread(target=_kubelet_for_test_pods, args=(kube, stop, rewrite, log), daemon=True)
        kubelet.start()
        try:
            tested = _helm(kube, "test", RELEASE, "-n", ns, "--timeout", "90s", check=False)
        finally:
            stop.set()
            kubelet.join(timeout=30)
        assert tested.returncode == 0, tested.stdout + tested.stderr + "\n".join(log)
        assert "Succeeded" in tested.stdout

        # Every sample becomes Ready in the restricted namespace (worker and router pods admitted).
        samples = sorted((ROOT / "deploy" / "samples").glob("*.yaml"))
        for sample in samples:
            kube.kubectl("apply", "-f", str(sample))
        names = [yaml.safe_load(s.read_text())["metadata"]["name"] for s in samples]
        for name in names:
            kube.kubectl("wait", "--for=condition=Ready", f"servingdeployments.triphase.dev/{name}",
                         "--timeout=120s")
        rule = json.loads(kube.kubectl("get", "prometheusrules.monitoring.coreos.com", f"{names[0]}-slo",
                                       "-o", "json").stdout)
        assert rule["metadata"]["labels"]["release"] == "prometheus"  # the chart's monitoring.labels
        for name in names:  # while the operator runs: it removes its finalizer
            kube.kubectl("delete", "servingdeployments.triphase.dev", name, "--timeout=60s")

    # Upgrade with changed values: the operator's arguments and the monitoring labels follow.
    _helm(kube, "upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values", "--set", "operator.resyncSeconds=7",
          "--set", "monitoring.labels.release=prom", "--wait", "--timeout", "120s")
    upgraded = json.loads(kube.kubectl("get", "deployment", fullname, "-o", "json").stdout)
    args = upgraded["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--resync-seconds") + 1] == "7"
    assert "release=prom" in args
    alerts = json.loads(kube.kubectl("get", "prometheusrules.monitoring.coreos.com", f"{fullname}-alerts",
                                     "-o", "json").stdout)
    assert alerts["metadata"]["labels"]["release"] == "prom"
    assert "REVISION: 2" in _helm(kube, "status", RELEASE, "-n", ns).stdout

    # Uninstall: the chart's objects go; the CRDs stay (helm never deletes what crds/ installed).
    _helm(kube, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/managed-by=Helm"
    left = kube.kubectl("get", "deployments,services,serviceaccounts,configmaps,prometheusrules,servicemonitors,"
                        "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", selector, "-o", "name").stdout
    assert left.strip() == ""
    kube.kubectl("get", "crd", "servingdeployments.triphase.dev", "servingpools.triphase.dev")
