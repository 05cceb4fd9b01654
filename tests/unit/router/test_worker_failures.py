"""How the router reads a worker's gRPC errors: which are failures, which are something else."""

from __future__ import annotations

import grpc
import pytest

from triphase.api.v1 import worker_pb2 as pb
from triphase.common.roles import Role
from triphase.router.errors import BadRequest
from triphase.router.worker_client import (
    HandedOver,
    HandOffFailed,
    RoleRefused,
    WorkerFailed,
    _failure,
    _stream_failure,
)


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


@pytest.mark.parametrize(("error", "kind"), [
    (pb.StreamError(code=grpc.StatusCode.UNAVAILABLE.value[0], message="moved", handed_over=True), HandedOver),
    (pb.StreamError(code=grpc.StatusCode.UNAVAILABLE.value[0], message="switching"), WorkerFailed),
    (pb.StreamError(code=grpc.StatusCode.ABORTED.value[0], message="pin expired"), HandOffFailed),
    (pb.StreamError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad"), BadRequest),
    (pb.StreamError(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="draining"), WorkerFailed),
    (pb.StreamError(code=99, message="from a newer worker"), WorkerFailed),
])
def test_a_session_streams_ending_reads_as_the_same_status_of_a_call(error, kind):
    assert type(_stream_failure(error)) is kind


def test_a_session_streams_role_refusal_names_the_role():
    failure = _stream_failure(pb.StreamError(code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                             message="worker w is prefill", role=pb.ROLE_PREFILL))
    assert isinstance(failure, RoleRefused) and failure.role is Role.PREFILL
