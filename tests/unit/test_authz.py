"""Who may call which worker method (workers/authz.py)."""

from __future__ import annotations

import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.block_hash import prompt_block_hashes, salted_root
from triphase.workers.authz import CALLERS, refusal

METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["WorkerService"].methods]


def test_every_method_names_who_may_call_it():
    assert sorted(CALLERS) == sorted(METHODS)
    assert all(CALLERS.values())


@pytest.mark.parametrize(("identity", "allowed"), [
    ("router", {"Prefill", "Decode", "Generate", "Session", "Encode", "WatchStats", "HandOver", "ReleaseKv"}),
    ("control", {"WatchStats", "HandOver", "SetRole", "Drain"}),
    ("worker", {"ReadKv", "ReleaseKv", "ReadEmbeddings"}),
    ("someone", set()),
    ("", set()),
])
def test_each_identity_may_call_only_its_methods(identity, allowed):
    assert {m for m in METHODS if refusal(m, identity) is None} == allowed
    for method in sorted(set(METHODS) - allowed):
        reason = refusal(method, identity)
        assert reason is not None
        assert reason.startswith(f"{method} is for ")
        assert reason.endswith(f"the caller's certificate says {identity!r}")


def test_a_refusal_names_who_may_call():
    assert refusal("SetRole", "router") == "SetRole is for control; the caller's certificate says 'router'"
    assert refusal("ReleaseKv", "control") == (
        "ReleaseKv is for router, worker; the caller's certificate says 'control'")
    assert refusal("Unknown", "router") == "Unknown is for nobody; the caller's certificate says 'router'"


def test_a_salted_prefix_hash_is_another_chain():
    tokens = list(range(64))
    plain = prompt_block_hashes(tokens, 16)
    salted = prompt_block_hashes(tokens, 16, root=salted_root(b"salt-a"))
    assert len(salted) == 4 and not set(plain) & set(salted)
    assert salted != prompt_block_hashes(tokens, 16, root=salted_root(b"salt-b"))
    assert salted_root(b"") is None
