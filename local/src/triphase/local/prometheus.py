"""A real Prometheus for one machine: built from the Go module proxy, started on 127.0.0.1.

`ensure()` builds `prometheus` and `promtool` (github.com/prometheus/prometheus at a pinned module
version; the module's v0.3MM.P tags are Prometheus 3.MM.P) into `<cache>/prometheus-<version>/bin`,
once, with progress on stderr. `Prometheus` runs one against a scrape configuration, waits until it
is ready and answers instant and range queries over the HTTP API, the way the planner and the tests
read it. `triphase up --prometheus` starts one that scrapes the local stack.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from triphase.common import labels
from triphase.common.errors import UserError
from triphase.common.process.endpoints_file import replace_text
from triphase.common.process.net import free_port
from triphase.local.gobuild import cache_root, go_binary, go_install, module_files, say

MODULE = "github.com/prometheus/prometheus"
VERSION = "v0.316.0"
RELEASE = "3.16.0"  # what `prometheus --version` reports for that module version
TOOLS = ("prometheus", "promtool")


def tools_dir() -> pathlib.Path:
    return cache_root() / f"prometheus-{VERSION}"


@dataclasses.dataclass(frozen=True)
class Tools:
    bin: pathlib.Path

    @property
    def prometheus(self) -> str:
        return str(self.bin / "prometheus")

    @property
    def promtool(self) -> str:
        return str(self.bin / "promtool")


def installed() -> Tools | None:
    bin_dir = tools_dir() / "bin"
    return Tools(bin_dir) if all((bin_dir / tool).is_file() for tool in TOOLS) else None


def ensure(progress: bool = True) -> Tools:
    """prometheus and promtool, built on first use (about 6 minutes on two cores), instant afterwards."""
    tools = installed()
    if tools is not None:
        return tools
    go = go_binary("Prometheus")
    bin_dir = tools_dir() / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    stamp = " ".join(f"-X github.com/prometheus/common/version.{key}={value}"
                     for key, value in (("Version", RELEASE), ("Branch", "HEAD"), ("Revision", VERSION)))
    started = time.monotonic()
    say(progress, "triphase prometheus", f"building prometheus and promtool {RELEASE} from the Go module proxy "
                                          f"into {bin_dir} (first run only; several minutes)")
    go_install(go, [f"{MODULE}/cmd/{tool}@{VERSION}" for tool in TOOLS], bin_dir, ldflags=f"-s -w {stamp}")
    say(progress, "triphase prometheus", f"built in {time.monotonic() - started:.0f} s")
    tools = installed()
    if tools is None:
        raise UserError(f"prometheus or promtool missing in {bin_dir} after the build")
    return tools


# What a PodMonitor would add to a ServingDeployment's series, for the local stack (deployment local/local):
# the SLO rules, alerts and dashboards select it as they select a deployment in a cluster.
LOCAL_LABELS = {"namespace": labels.LOCAL_NAMESPACE, labels.PROMETHEUS_DEPLOYMENT: labels.LOCAL_NAME}

OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator"
OPERATOR_VERSION = "v0.85.0"  # the newest version of the root module the proxy serves
OPERATOR_CRDS = "example/prometheus-operator-crd"


def operator_crds(kinds: Sequence[str] = ("servicemonitors", "podmonitors", "prometheusrules")) -> list[pathlib.Path]:
    """The Prometheus operator's CRDs (monitoring.coreos.com), as it publishes them, from its module on the
    Go module proxy: a control plane that serves them validates ServiceMonitors, PodMonitors and
    PrometheusRules as a real cluster would."""
    return module_files(OPERATOR_MODULE, OPERATOR_VERSION, OPERATOR_CRDS,
                        [f"monitoring.coreos.com_{kind}.yaml" for kind in kinds],
                        cache_root() / f"prometheus-operator-{OPERATOR_VERSION}")


def scrape_config(jobs: Mapping[str, Sequence[str]], interval_s: float = 1.0,
                  labels: Mapping[str, str] | None = None,
                  target_files: Mapping[str, pathlib.Path] | None = None) -> dict[str, Any]:
    """A configuration that scrapes `host:port` targets per job name every `interval_s`, adding `labels`
    to every series (e.g. the `namespace` and deployment labels a PodMonitor would add in a cluster).
    `target_files`: jobs whose targets are in a file Prometheus re-reads as it changes
    (`write_targets`), for targets that come and go."""
    interval = f"{int(interval_s * 1000)}ms"
    extra = {"labels": dict(labels)} if labels else {}
    configs: list[dict[str, Any]] = [{"job_name": job, "static_configs": [{"targets": list(targets), **extra}]}
                                     for job, targets in jobs.items() if targets]
    configs += [{"job_name": job, "file_sd_configs": [{"files": [str(path)], "refresh_interval": "1s"}]}
                for job, path in (target_files or {}).items()]
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": configs}


def write_targets(path: pathlib.Path, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
    """A file_sd target file (replaced at once, so Prometheus never reads half of it)."""
    replace_text(path, json.dumps([{"targets": sorted(targets), "labels": dict(labels or {})}]))


class QueryError(Exception):
    """Prometheus answered a query with an error, or could not be reached."""


class Prometheus:
    """One Prometheus process on 127.0.0.1 with its own data directory; a context manager."""

    def __init__(self, config: Mapping[str, Any], *, port: int | None = None, workdir: pathlib.Path | None = None,
                 tools: Tools | None = None, retention: str = "2h") -> None:
        self.tools = tools or ensure()
        self.port = port or free_port()
        self.workdir = workdir or pathlib.Path(tempfile.mkdtemp(prefix="triphase-prometheus-"))
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = self.workdir / "prometheus.yml"
        self.config = dict(config)
        self.retention = retention
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(
            [self.tools.prometheus, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--storage.tsdb.retention.time={self.retention}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--web.enable-lifecycle"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"prometheus exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)  # polling readiness, bounded by the deadline
        self.stop()
        raise UserError(f"prometheus was not ready within {timeout_s:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        text = (self.workdir / "prometheus.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def api(self, path: str, params: Mapping[str, str], timeout_s: float = 10.0) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise QueryError(f"{body.get('errorType', exc.code)}: {body.get('error', exc.reason)}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise QueryError(f"prometheus at {self.url} unreachable: {exc}") from exc
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (each item: `metric` labels and `value` [t, "v"])."""
        return list(self.api("query", {"query": expr})["result"])

    def targets_up(self) -> dict[str, bool]:
        """`job/instance` -> whether its last scrape succeeded."""
        data = self.api("targets", {"state": "active"})
        return {f"{t['labels']['job']}/{t['labels']['instance']}": t["health"] == "up" for t in data["activeTargets"]}
