"""Fuzzing the HTTP API from its own OpenAPI description (schemathesis over hypothesis): bodies that
fit the schema and bodies that break it, for every operation, against a real router and simulated
worker. No answer may be a 5xx; every error is an OpenAI error body without internal text; the router
log holds no traceback. Examples per operation and mode: TRIPHASE_FUZZ_EXAMPLES."""

from __future__ import annotations

import os

import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from triphase.local.processes import http_ok, triphase_process, wait_for

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("TRIPHASE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="TRIPHASE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-http")
    worker_args = ["worker", "--engine", "sim", "--role", "both", "--port", "0", "--sim-prefill-ms", "0",
                   "--sim-decode-ms", "0", "--kv-cache-mib", "16"]
    with triphase_process(tmp, "worker", worker_args) as (_, worker_port), \
            triphase_process(tmp, "router", ["router", "--workers", f"127.0.0.1:{worker_port}", "--port", "0",
                                             "--max-model-len", "256"]) as (proc, port):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/readyz"), 60, "the router to see its worker")
        process = psutil.Process(proc.pid)
        yield {"url": url, "log": tmp / "router.log", "process": process, "rss": process.memory_info().rss}


def operations(url: str):
    schema = schemathesis.openapi.from_dict(requests.get(f"{url}/openapi.json", timeout=10).json())
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_input_gets_a_server_error(router, mode):
    tried = 0
    for operation in operations(router["url"]):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to get wrong: no parameters, no body
        @FUZZ
        @given(operation.as_strategy(generation_mode=mode))
        def check(case):
            nonlocal tried
            tried += 1
            response = case.call(base_url=router["url"], timeout=60)
            assert response.status_code < 500, (case.body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and "Traceback" not in error["message"], response.text

        check()
    assert tried >= 5


def test_the_router_is_whole_afterwards(router):
    assert http_ok(f"{router['url']}/readyz")
    assert "Traceback" not in router["log"].read_text()
    assert router["process"].memory_info().rss < router["rss"] * 1.25 + (32 << 20)  # back near its baseline
