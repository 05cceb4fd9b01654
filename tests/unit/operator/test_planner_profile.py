"""Where the operator's planner takes decode capacity from (operator/planning.py): the profile a
ConfigMap holds, or, while it cannot be used, a fit to what the workers report; one Event per change."""

from __future__ import annotations

import json
from typing import Any

from triphase.common.profile import Profile
from triphase.control.balancer import Slo
from triphase.operator.kube import ApiError
from triphase.operator.planning import PROFILE_KEY, DeploymentPlanner

SPEC = {"model": {"source": "bundled"},
        "pools": {"prefill": {"replicas": 1, "maxReplicas": 2}, "decode": {"replicas": 1, "maxReplicas": 2}},
        "autoscaling": {"enabled": True, "prometheusUrl": "http://p:9090", "profileConfigMap": "prof"}}
PROFILE = Profile(0.01, 0.001, 0.02, 0.01, model="smollm2", engine="torch")


class ConfigMaps:
    """The one API call the profile needs: `answer` is returned, or raised when it is an exception."""

    def __init__(self) -> None:
        self.answer: Any = None

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        assert (api_version, kind, namespace, name) == ("v1", "ConfigMap", "ns", "prof")
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_the_profile_is_used_while_it_can_be_and_each_change_is_said_once():
    kube, said = ConfigMaps(), []
    planner = DeploymentPlanner(kube, {"metadata": {"name": "d", "namespace": "ns"}, "spec": SPEC},  # type: ignore[arg-type]
                                None, lambda kind, reason, message: said.append((kind, reason, message)))
    slo = Slo(2.0, 0.1)
    steps = []
    for answer in (None, ApiError(403, "forbidden"), {"data": {"other": "x"}}, {"data": {PROFILE_KEY: "{"}},
                   {"data": {PROFILE_KEY: json.dumps(PROFILE.to_json())}},
                   {"data": {PROFILE_KEY: json.dumps(PROFILE.to_json())}}):
        kube.answer = answer
        steps.append(await planner.profile(slo))
    assert steps == [None] * 4 + [PROFILE] * 2
    assert [(k, r) for k, r, _ in said] == [("Warning", "ProfileUnusable")] * 4 + [("Normal", "ProfileLoaded")]
    assert said[0][2] == "ConfigMap prof not found; capacity comes from what the workers report"
    assert said[1][2].startswith("ConfigMap prof could not be read (403: forbidden)")
    assert said[2][2].startswith("ConfigMap prof has no key profile.json")
    assert "is not a triphase profile" in said[3][2]
    assert said[4][2] == ("Capacity from ConfigMap prof (smollm2, engine torch): 8.0 decode streams per worker at "
                          "the 0.1 s TPOT target; 981 prompt tokens/s per prefill worker until one is measured")
