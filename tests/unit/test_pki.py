"""The deployment CA and component certificates (common/security/pki.py), and the bundle that carries them."""

from __future__ import annotations

import datetime
import os

import pytest

from triphase.common.errors import UserError
from triphase.common.security import mtls, pki

NOW = datetime.datetime(2026, 11, 30, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def ca():
    return pki.new_ca("demo", now=NOW)


@pytest.mark.parametrize("identity", list(pki.Identity))
def test_a_component_certificate_names_its_identity_and_chains_to_the_ca(ca, identity):
    leaf = pki.issue(ca, identity, now=NOW)
    assert pki.identity_of(leaf.cert_pem) == identity.value
    assert pki.signed_by(leaf.cert_pem, ca.cert_pem)
    assert not pki.signed_by(leaf.cert_pem, pki.new_ca("other", now=NOW).cert_pem)
    assert not pki.signed_by(b"not a certificate", ca.cert_pem)


def test_renewal_is_due_in_the_last_third_of_a_certificate_s_life(ca):
    leaf = pki.issue(ca, pki.Identity.WORKER, days=30, now=NOW)
    assert not pki.renewal_due(leaf.cert_pem, now=NOW + datetime.timedelta(days=19))
    assert pki.renewal_due(leaf.cert_pem, now=NOW + datetime.timedelta(days=21))
    assert pki.renewal_due(b"garbage")


def test_each_component_gets_only_the_secrets_it_needs(ca):
    files = {i: mtls.component_files(ca, i, ticket_key=b"k" * 64, prefix_salt=b"s" * 64) for i in pki.Identity}
    assert set(files[pki.Identity.WORKER]) == {mtls.CA, mtls.CERT, mtls.KEY, mtls.TICKET_KEY, mtls.PREFIX_SALT}
    assert set(files[pki.Identity.ROUTER]) == {mtls.CA, mtls.CERT, mtls.KEY, mtls.PREFIX_SALT}
    assert set(files[pki.Identity.CONTROL]) == {mtls.CA, mtls.CERT, mtls.KEY}


def test_a_bundle_is_private_and_follows_a_rotation(tmp_path):
    dirs = mtls.write_deployment(tmp_path, "demo")
    worker = dirs[pki.Identity.WORKER]
    assert oct(os.stat(worker).st_mode & 0o777) == "0o700"
    assert all(oct(os.stat(f).st_mode & 0o777) == "0o600" for f in worker.iterdir())
    bundle = mtls.Bundle(worker, reload_s=0)
    assert bundle.identity == "worker" and bundle.ticket_key and len(bundle.prefix_salt) == 64
    assert not bundle.refresh()  # nothing changed
    first = bundle.fingerprint()
    ca = pki.new_ca("demo")
    mtls.write_bundle(worker, mtls.component_files(ca, pki.Identity.WORKER, ticket_key=b"k", prefix_salt=b"s"))
    assert bundle.refresh() and bundle.generation == 1 and bundle.fingerprint() != first
    (worker / mtls.KEY).unlink()  # a rotation half done: the bundle keeps what it had
    assert not bundle.refresh() and bundle.generation == 1


def test_a_bundle_missing_files_or_of_another_identity_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"lacks ca\.crt, tls\.crt, tls\.key"):
        mtls.Bundle(tmp_path)
    dirs = mtls.write_deployment(tmp_path / "d", "demo")

    class Args:
        mtls_dir = dirs[pki.Identity.ROUTER]

    with pytest.raises(UserError, match="for 'router', not for 'worker'"):
        mtls.from_args(Args(), pki.Identity.WORKER)
    assert mtls.from_args(Args(), pki.Identity.ROUTER) is not None
