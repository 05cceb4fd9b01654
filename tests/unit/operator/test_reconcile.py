"""A spec the API server let through but the models reject: Degraded with the field, before any API call."""

from __future__ import annotations

import pytest

from triphase.operator.reconcile import InvalidSpec, reconcile


async def test_invalid_spec_becomes_degraded_without_touching_the_cluster():
    body = {"metadata": {"name": "bad", "namespace": "ns", "uid": "u", "generation": 3},
            "spec": {"model": {"source": "bundled"}, "pools": {"decode": {"replicas": -1}}}}
    with pytest.raises(InvalidSpec, match=r"spec\.pools\.decode\.replicas") as err:
        await reconcile(None, body)  # type: ignore[arg-type]  # never reached: no client needed
    conditions = {c["type"]: c for c in err.value.status["conditions"]}
    assert err.value.status["observedGeneration"] == 3
    assert (conditions["Degraded"]["status"], conditions["Degraded"]["reason"]) == ("True", "InvalidSpec")
    assert conditions["Ready"]["status"] == "False"
