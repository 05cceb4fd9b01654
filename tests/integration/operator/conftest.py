"""The operator's ServiceAccount, once per test module (each module has a namespace of its own)."""

from __future__ import annotations

import pytest

from tests.integration.operator import helpers


@pytest.fixture(scope="module")
def operator_account(kube, tmp_path_factory):
    return helpers.operator_account(kube, tmp_path_factory)
