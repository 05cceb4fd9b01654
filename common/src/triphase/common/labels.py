"""Kubernetes labels and annotations shared by the operator (which sets them) and the router (which
discovers workers by them). One place, so the two cannot drift."""

from __future__ import annotations

DOMAIN = "triphase.dev"
DEPLOYMENT = f"{DOMAIN}/deployment"  # label: the ServingDeployment a pod belongs to
COMPONENT = f"{DOMAIN}/component"  # label: "worker" or "router"
ROLE = f"{DOMAIN}/role"  # label: the role the pod's pool was created with (the worker reports its current one)
CURRENT_ROLE = f"{DOMAIN}/current-role"  # label: the role the balancer last switched the pod to
WORKER_SELECTOR = f"{COMPONENT}=worker"  # every worker pod (the router's default discovery selector)
ENDPOINT = f"{DOMAIN}/endpoint"  # annotation: host:port of the worker's gRPC server, overriding podIP:port
# The DEPLOYMENT label on every scraped series (a PodMonitor's podTargetLabels, sanitised as Prometheus does):
# the planner selects one ServingDeployment's metrics with it, together with `namespace`.
PROMETHEUS_DEPLOYMENT = DEPLOYMENT.replace(".", "_").replace("/", "_")
# `triphase up` labels what it scrapes as if the stack were ServingDeployment local/local, so the SLO rules,
# alerts and dashboards select it as they select a deployment in a cluster.
LOCAL_NAMESPACE = "local"
LOCAL_NAME = "local"
LOCAL_DEPLOYMENT = f"{LOCAL_NAMESPACE}/{LOCAL_NAME}"  # the control loops' `deployment` label
GRPC_PORT_NAME = "grpc"  # the worker container's gRPC port is named this
DEFAULT_GRPC_PORT = 50051
