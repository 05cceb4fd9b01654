"""Which pods are workers that can take traffic, and at which address."""

from __future__ import annotations

import copy

from triphase.common.k8s.pods import pod_endpoint

READY = {
    "metadata": {"name": "w"},
    "spec": {"containers": [{"name": "worker", "ports": [{"name": "metrics", "containerPort": 9100},
                                                         {"name": "grpc", "containerPort": 7000}]}]},
    "status": {"phase": "Running", "podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]},
}


def _with(path, value):
    pod = copy.deepcopy(READY)
    *parents, key = path.split(".")
    node = pod
    for part in parents:
        node = node[part]
    node[key] = value
    return pod


def test_ready_pod_uses_the_grpc_port():
    assert pod_endpoint(READY) == "10.0.0.7:7000"


def test_default_port_ipv6_and_annotation_override():
    no_ports = _with("spec.containers", [{"name": "worker"}])
    assert pod_endpoint(no_ports) == "10.0.0.7:50051"
    assert pod_endpoint(_with("status.podIP", "fd00::7")) == "[fd00::7]:7000"
    annotated = _with("metadata.annotations", {"triphase.dev/endpoint": "127.0.0.1:5555"})
    assert pod_endpoint(annotated) == "127.0.0.1:5555"


def test_pods_that_cannot_take_traffic_are_left_out():
    assert pod_endpoint(_with("status.phase", "Pending")) is None
    assert pod_endpoint(_with("status.conditions", [{"type": "Ready", "status": "False"}])) is None
    assert pod_endpoint(_with("metadata.deletionTimestamp", "2026-11-25T00:00:00Z")) is None
    assert pod_endpoint(_with("status.podIP", "")) is None
