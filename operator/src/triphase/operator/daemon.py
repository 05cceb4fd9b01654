"""What a control loop of one ServingDeployment holds (the role balancer's, the planner's): the API
client, kopf's live view of the object (always its latest spec) and a way to post Events on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from triphase.operator.api.v1alpha1 import ServingDeploymentSpec
from triphase.operator.kube import Kube
from triphase.operator.reconcile import parse

PostEvent = Callable[[str, str, str], None]  # (type, reason, message)


class DeploymentDaemon:
    def __init__(self, kube: Kube, body: Any, post: PostEvent) -> None:
        self.kube = kube
        self.body = body
        self.namespace: str = body["metadata"]["namespace"]
        self.name: str = body["metadata"]["name"]
        self.post = post

    @property
    def deployment(self) -> str:
        return f"{self.namespace}/{self.name}"

    def live_spec(self) -> ServingDeploymentSpec:
        """The latest spec, parsed (InvalidSpec if it cannot be served)."""
        return parse(dict(self.body.get("spec") or {}))
