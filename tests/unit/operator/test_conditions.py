from triphase.operator.conditions import get, set_condition


def test_transition_time_moves_only_on_status_change():
    conds = set_condition([], "Ready", False, "Starting", "0/2 ready", 1, at="t1")
    conds = set_condition(conds, "Ready", False, "Starting", "1/2 ready", 2, at="t2")
    assert get(conds, "Ready") == {"type": "Ready", "status": "False", "reason": "Starting", "message": "1/2 ready",
                                   "observedGeneration": 2, "lastTransitionTime": "t1"}
    conds = set_condition(conds, "Ready", True, "AllReady", "2/2 ready", 2, at="t3")
    assert get(conds, "Ready")["lastTransitionTime"] == "t3"
    conds = set_condition(conds, "Degraded", None, "Unknown", "", 2, at="t4")
    assert [c["type"] for c in conds] == ["Ready", "Degraded"] and get(conds, "Degraded")["status"] == "Unknown"
