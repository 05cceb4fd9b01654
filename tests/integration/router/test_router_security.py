"""The router's client side of security, on real processes: API keys (401 without one or with a wrong
one, rotation without a restart, a `key` label that never shows the key), HTTPS on the API port,
/readyz and /metrics on an internal port only, and mTLS to its workers."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import re
import ssl
import urllib.error
import urllib.request

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from triphase.common.security import mtls, pki
from triphase.local.processes import start_triphase, stop_all, wait_for
from triphase.router.tls import ServerTls

pytestmark = pytest.mark.slow
ALICE, BOB, CAROL = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef", "sk-carol-0123456789abcdef"


def server_certificate(ca: pki.KeyPair, host: str = "127.0.0.1") -> pki.KeyPair:
    """What a user gives the router for its API: a certificate for the address clients use."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return pki.KeyPair(cert.public_bytes(serialization.Encoding.PEM),
                       key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure-router")
    bundles = mtls.write_deployment(tmp / "mtls", "demo")
    api_ca = pki.new_ca("api")
    served = server_certificate(api_ca)
    (tmp / "api-ca.crt").write_bytes(api_ca.cert_pem)
    (tmp / "tls.crt").write_bytes(served.cert_pem)
    (tmp / "tls.key").write_bytes(served.key_pem)
    keys = tmp / "keys"
    keys.write_text(f"alice {ALICE}\n{BOB}\n")
    procs = []
    try:
        worker, port = start_triphase(tmp, "worker", ["worker", "--engine", "sim", "--port", "0", "--kv-cache-mib",
                                                      "16", "--mtls-dir", str(bundles[pki.Identity.WORKER])])
        procs.append(worker)
        router, api_port = start_triphase(tmp, "router", [
            "router", "--workers", f"127.0.0.1:{port}", "--port", "0", "--internal-port", "0",
            "--mtls-dir", str(bundles[pki.Identity.ROUTER]), "--api-key-file", str(keys),
            "--tls-cert", str(tmp / "tls.crt"), "--tls-key", str(tmp / "tls.key")])
        procs.append(router)
        internal = int((tmp / "router.port.internal").read_text())
        trust = ssl.create_default_context(cafile=str(tmp / "api-ca.crt"))
        wait_for(lambda: ready(f"http://127.0.0.1:{internal}"), 60, "the router to see its worker")
        yield {"url": f"https://127.0.0.1:{api_port}", "internal": f"http://127.0.0.1:{internal}", "keys": keys,
               "trust": trust, "tmp": tmp}
    finally:
        stop_all(procs, grace=30)


def ready(url):
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return response.status == 200
    except urllib.error.URLError:
        return False


def client(stack, key):
    return openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=key, max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(verify=stack["trust"]))


def ask(stack, key):
    with client(stack, key) as c:
        return c.completions.create(model="SmolLM2-135M-Instruct", prompt="hello", max_tokens=3)


def get(url, trust=None, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10,
                                    context=trust) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_no_key_or_a_wrong_key_is_401_and_a_right_one_is_served(stack):
    status, body = get(f"{stack['url']}/v1/models", stack["trust"])
    assert status == 401 and '"code": "invalid_api_key"' in body
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        ask(stack, ALICE + "x")
    assert ask(stack, ALICE).usage.completion_tokens == 3  # through mTLS to the worker
    assert ask(stack, BOB).usage.completion_tokens == 3


def test_two_authorization_headers_are_refused_whichever_comes_first(stack):
    """A valid key followed by a bogus one (or the other way round) is refused: checking only the first,
    while a proxy in front checks or logs the other, lets the two disagree about who is calling."""
    port = int(stack["url"].rsplit(":", 1)[1])
    for first, second in ((ALICE, "bogus"), ("bogus", ALICE)):
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=stack["trust"], timeout=10)
        connection.putrequest("GET", "/v1/models")
        connection.putheader("Authorization", f"Bearer {first}")
        connection.putheader("Authorization", f"Bearer {second}")
        connection.endheaders()
        response = connection.getresponse()
        body = response.read().decode()
        connection.close()
        assert response.status == 401 and "send one Authorization header" in body and ALICE not in body


def test_keys_rotate_without_a_restart(stack):
    stack["keys"].write_text(f"carol {CAROL}\nalice {ALICE}\n")

    def rotated():
        try:
            ask(stack, BOB)
        except openai.AuthenticationError:
            return True
        return False

    wait_for(rotated, 30, "bob's key to be revoked")
    assert ask(stack, CAROL).usage.completion_tokens == 3


def test_metrics_count_requests_by_key_name_on_the_internal_port_only(stack):
    ask(stack, ALICE)
    status, text = get(f"{stack['internal']}/metrics")
    assert status == 200
    assert re.search(r'triphase_requests_total\{key="alice",[^}]*status="ok"\} [1-9]', text)
    assert re.search(r'triphase_requests_total\{key="",[^}]*status="401"\} [1-9]', text)
    assert ALICE not in text and BOB not in text
    for path in ("/metrics", "/readyz"):  # not on the API port, key or not
        assert get(f"{stack['url']}{path}", stack["trust"], {"Authorization": f"Bearer {ALICE}"})[0] == 404
    status, body = get(f"{stack['internal']}/readyz")
    assert status == 200 and '"endpoint": "127.0.0.1:' in body


def test_the_api_port_speaks_only_tls(stack):
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(f"{stack['url']}/healthz")  # the system's trust store does not know the API's CA
    plain = stack["url"].replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"{plain}/healthz")
    assert get(f"{stack['url']}/healthz", stack["trust"])[0] == 200


def test_a_renewed_api_certificate_is_loaded_and_a_broken_one_is_not(tmp_path):
    ca = pki.new_ca("api")
    first, second = server_certificate(ca), server_certificate(ca)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(first.cert_pem)
    key.write_bytes(first.key_pem)
    tls = ServerTls(cert, key)
    assert not tls.reload()  # unchanged
    cert.write_bytes(second.cert_pem)  # half rotated: the key does not match yet
    assert not tls.reload()
    key.write_bytes(second.key_pem)
    assert tls.reload()
