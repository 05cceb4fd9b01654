"""How the router reads a worker's gRPC errors: which are failures, which are something else."""

from __future__ import annotations

import grpc
import pytest

from triphase.common.roles import Role
from triphase.router.worker_client import HandedOver, RoleRefused, WorkerFailed, _failure


def error(code, details, trailing=()):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


def test_a_role_refusal_names_the_role_the_worker_has_now():
    failure = _failure(error(grpc.StatusCode.FAILED_PRECONDITION, "worker w is prefill, not decode",
                             [("triphase-role", "prefill")]))
    assert isinstance(failure, RoleRefused) and failure.role is Role.PREFILL


@pytest.mark.parametrize("trailing", [(), [("triphase-role", "chef")]])
def test_other_precondition_failures_stay_failures(trailing):
    failure = _failure(error(grpc.StatusCode.FAILED_PRECONDITION, "worker w is draining", trailing))
    assert type(failure) is WorkerFailed


def test_a_hand_over_is_not_a_role_refusal():
    failure = _failure(error(grpc.StatusCode.UNAVAILABLE, "handed over", [("triphase-handed-over", "1")]))
    assert isinstance(failure, HandedOver) and not isinstance(failure, RoleRefused)
